//! The ecosystem formats against their reference tools' own outputs:
//! - `fixtures/mlx` (mlx-lm 0.32.2's trainer files and `mlx_lm fuse`),
//! - `fixtures/lycoris` (lycoris-lora 4.1.3: every algorithm, effective weights probed from the
//!   network's forward pass),
//! - `fixtures/kohya_sd` (LyCORIS's kohya entry point on a tiny SD1 UNet + CLIP; diffusers 0.42.1's
//!   `load_lora_weights` + `fuse_lora`; diffusers training-script files with and without metadata),
//! - `fixtures/flux` (kohya-ss sd-scripts' `lora_flux.py` files; its own merge into the BFL
//!   checkpoint; diffusers' conversion and fuse on the diffusers transformer).
//!
//! Every merge is compared tensor by tensor with the reference; conversions are checked by
//! merging their output and by round trips back to the source format.

mod common;

use std::path::{Path, PathBuf};

use adapterkit_core::TensorSource;
use adapterkit_formats::safetensors::SafetensorsFile;
use adapterkit_formats::Checkpoint;
use common::{failed, fixtures, manifest, ok, run};
use serde_json::Value;

/// Every tensor of `want` is in `got` (a checkpoint) and equal within `rel` of its largest
/// magnitude; returns the worst relative difference.
fn close(got: &Path, want: &Path, rel: f64) -> f64 {
    let (d, name) = worst(got, want);
    assert!(
        d <= rel,
        "{}: {name} differs from {} by {d:e} of its scale",
        got.display(),
        want.display()
    );
    d
}

/// The largest difference of any tensor of `want` from `got`'s, relative to its scale.
fn worst(got: &Path, want: &Path) -> (f64, String) {
    let g = Checkpoint::open(got).unwrap();
    let w = SafetensorsFile::open(want).unwrap();
    let mut worst = (0f64, String::new());
    for t in w.tensors() {
        let gi = g
            .info(&t.name)
            .unwrap_or_else(|| panic!("{}: no {}", got.display(), t.name));
        assert_eq!(gi.shape, t.shape, "{}: shape", t.name);
        let (x, y) = (g.read_f32(&t.name).unwrap(), w.read_f32(&t.name).unwrap());
        let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
        let d = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0f64, f64::max)
            / scale;
        if d >= worst.0 {
            worst = (d, t.name.clone());
        }
    }
    worst
}

/// Every tensor of `got` not in `changed` equals `base` exactly.
fn unchanged_except(got: &Path, base: &Path, changed: &Path) {
    let g = Checkpoint::open(got).unwrap();
    let b = SafetensorsFile::open(base).unwrap();
    let c = SafetensorsFile::open(changed).unwrap();
    for t in b.tensors() {
        if c.info(&t.name).is_none() {
            assert_eq!(
                g.read_f32(&t.name).unwrap(),
                b.read_f32(&t.name).unwrap(),
                "{}: {} changed",
                got.display(),
                t.name
            );
        }
    }
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"merge", &base, &adapter, &"-o", &out];
    for e in extra {
        args.push(e);
    }
    ok(&run(&args));
}

fn convert(input: &Path, to: &str, out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"convert", &input, &"--to", &to, &"-o", &out];
    for e in extra {
        args.push(e);
    }
    let o = run(&args);
    ok(&o);
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn s<'a>(c: &'a Value, k: &str) -> &'a str {
    c[k].as_str().unwrap_or_else(|| panic!("{k} in {c}"))
}

#[test]
fn mlx_adapters_merge_to_what_mlx_lm_fuses() {
    let dir = fixtures("mlx");
    let tmp = tempfile::tempdir().unwrap();
    for c in manifest("mlx") {
        let name = s(&c, "name");
        let out = tmp.path().join(format!("{name}.safetensors"));
        let adapter = dir.join(s(&c, "adapter"));
        if name == "dora_embed" {
            // mlx-lm's DoRA on an embedding normalises per vocabulary row; PEFT's DoRA (the IR)
            // per embedding column. Refused, with the reason.
            let e = failed(&run(&[&"merge", &dir.join("base"), &adapter, &"-o", &out]));
            assert!(e.contains("vocabulary row"), "{e}");
            assert!(!out.exists());
            continue;
        }
        merge(&dir.join("base"), &adapter, &out, &[]);
        close(&out, &dir.join(s(&c, "expected")), 1e-5);
    }
}

#[test]
fn mlx_and_peft_convert_both_ways() {
    let dir = fixtures("mlx");
    let tmp = tempfile::tempdir().unwrap();
    for name in ["lora_default", "dora"] {
        let c = common::case_in("mlx", name);
        let fused = dir.join(s(&c, "expected"));
        // PEFT twin → MLX → merge equals mlx-lm's fuse.
        let peft_dir = dir.join(s(&c, "peft_adapter"));
        let to_mlx = tmp.path().join(format!("{name}-mlx"));
        convert(&peft_dir, "mlx", &to_mlx, &[]);
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(to_mlx.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg["fine_tune_type"],
            if name == "dora" { "dora" } else { "lora" }
        );
        let out = tmp.path().join(format!("{name}-a.safetensors"));
        merge(&dir.join("base"), &to_mlx, &out, &[]);
        close(&out, &fused, 1e-5);
        // MLX → PEFT gives the PEFT twin's tensors exactly (transposes are exact) and its scale.
        let to_peft = tmp.path().join(format!("{name}-peft"));
        convert(&dir.join(s(&c, "adapter")), "peft", &to_peft, &[]);
        let mine = SafetensorsFile::open(to_peft.join("adapter_model.safetensors")).unwrap();
        let twin = SafetensorsFile::open(peft_dir.join("adapter_model.safetensors")).unwrap();
        for t in twin.tensors() {
            let m = mine
                .info(&t.name)
                .unwrap_or_else(|| panic!("no {}", t.name));
            assert_eq!(m.shape, t.shape, "{}", t.name);
            assert_eq!(
                mine.read_f32(&t.name).unwrap(),
                twin.read_f32(&t.name).unwrap(),
                "{}",
                t.name
            );
        }
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(to_peft.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap(),
            2.0
        );
        let out = tmp.path().join(format!("{name}-b.safetensors"));
        merge(&dir.join("base"), &to_peft, &out, &[]);
        close(&out, &fused, 1e-5);
    }
}

/// LyCORIS cases this version refuses, with the words its error must contain.
const LYCORIS_REFUSED: &[(&str, &str)] = &[
    ("locon_dora_wd_in", "wd_on_out"),
    ("loha_dora", "DoRA on a LoHa/LoKr"),
    ("lokr_dora", "DoRA on a LoHa/LoKr"),
    ("tlora", "TLoRA"),
];

#[test]
fn lycoris_files_merge_to_what_the_network_computes() {
    let dir = fixtures("lycoris");
    let tmp = tempfile::tempdir().unwrap();
    let base = dir.join("base.safetensors");
    let mut merged = 0;
    for c in manifest("lycoris") {
        let name = s(&c, "name");
        // Bypass mode is a run-time switch of the network (the same file); DyLoRA files cannot
        // be told from LoCon files (README: both are documented).
        if c["twin_of"].is_string() || name == "dylora" {
            continue;
        }
        let adapter = dir.join(s(&c, "adapter"));
        let out = tmp.path().join(format!("{name}.safetensors"));
        if let Some((_, why)) = LYCORIS_REFUSED.iter().find(|(n, _)| *n == name) {
            let e = failed(&run(&[&"merge", &base, &adapter, &"-o", &out]));
            assert!(e.contains(why), "{name}: {e}");
            assert!(!out.exists());
            continue;
        }
        merge(&base, &adapter, &out, &[]);
        close(&out, &dir.join(s(&c, "forward")), 1e-5);
        // Everything the forward leaves alone (biases of IA3/OFT modules included) is the base's.
        unchanged_except(&out, &base, &dir.join(s(&c, "forward")));
        merged += 1;
        // LoHa/LoKr with a scale other than 1: LyCORIS's own merge_to applies it twice; the
        // forward is followed, so the result must differ from merge_to.
        if c["max_abs_forward_minus_merge_to"].as_f64().unwrap_or(0.0) > 1e-3 {
            let (d, _) = worst(&out, &dir.join(s(&c, "merge_to")));
            assert!(
                d > 1e-3,
                "{name}: matches LyCORIS's merge_to, not its forward"
            );
        }
    }
    assert_eq!(merged, 22, "LyCORIS cases merged");
}

#[test]
fn lycoris_converts_to_peft_and_back() {
    let dir = fixtures("lycoris");
    let tmp = tempfile::tempdir().unwrap();
    let base = dir.join("base.safetensors");
    for name in [
        "locon",
        "locon_tucker",
        "locon_rslora",
        "locon_dora",
        "loha",
        "loha_tucker",
        "lokr",
        "lokr_decompose_both",
        "lokr_full",
        "lokr_tucker",
    ] {
        let c = common::case_in("lycoris", name);
        let adapter = dir.join(s(&c, "adapter"));
        let forward = dir.join(s(&c, "forward"));
        let peft = tmp.path().join(format!("{name}-peft"));
        convert(&adapter, "peft", &peft, &["--base", base.to_str().unwrap()]);
        let out = tmp.path().join(format!("{name}-peft.safetensors"));
        merge(&base, &peft, &out, &[]);
        close(&out, &forward, 1e-5);
        // … and back to LyCORIS: same merge.
        let back = tmp.path().join(format!("{name}-back.safetensors"));
        convert(&peft, "lycoris", &back, &[]);
        let out2 = tmp.path().join(format!("{name}-back-merged.safetensors"));
        merge(&base, &back, &out2, &[]);
        close(&out2, &forward, 1e-5);
    }
    // LyCORIS IA3 on outputs leaves biases alone; PEFT's would scale them: refused for a layer
    // with a bias, naming it.
    let e = failed(&run(&[
        &"convert",
        &dir.join("ia3/adapter.safetensors"),
        &"--to",
        &"peft",
        &"--base",
        &base,
        &"-o",
        &tmp.path().join("ia3"),
    ]));
    assert!(e.contains("has a bias"), "{e}");
    // Flattened names need the base to be resolved: refused without it, naming the fix.
    let e = failed(&run(&[
        &"convert",
        &dir.join("locon/adapter.safetensors"),
        &"--to",
        &"peft",
        &"-o",
        &tmp.path().join("x"),
    ]));
    assert!(e.contains("--base"), "{e}");
}

#[test]
fn kohya_sd_files_merge_into_the_pipeline_as_diffusers_fuses_them() {
    let dir = fixtures("kohya_sd");
    let tmp = tempfile::tempdir().unwrap();
    for c in manifest("kohya_sd") {
        let name = s(&c, "name");
        let out = tmp.path().join(name);
        merge(&dir.join("base"), &dir.join(s(&c, "adapter")), &out, &[]);
        for comp in ["unet", "text_encoder"] {
            close(&out.join(comp), &dir.join(s(&c["expected"], comp)), 1e-5);
        }
        for v in c["variants"].as_array().into_iter().flatten() {
            let vname = s(v, "name");
            let out = tmp.path().join(format!("{name}-{vname}"));
            merge(&dir.join("base"), &dir.join(s(v, "adapter")), &out, &[]);
            for comp in ["unet", "text_encoder"] {
                close(&out.join(comp), &dir.join(s(&v["expected"], comp)), 1e-5);
            }
        }
    }
}

#[test]
fn kohya_sd_converts_through_every_diffusion_format() {
    let dir = fixtures("kohya_sd");
    let tmp = tempfile::tempdir().unwrap();
    let base = dir.join("base");
    let c = common::case_in("kohya_sd", "lycoris_lora");
    let lora = dir.join(s(&c, "adapter"));
    // kohya → diffusers → merge; kohya → diffusers → kohya → merge.
    let d = tmp.path().join("d");
    convert(&lora, "diffusers", &d, &["--base", base.to_str().unwrap()]);
    let back = tmp.path().join("back.safetensors");
    convert(&d, "kohya", &back, &[]);
    for (i, a) in [d.clone(), back.clone()].iter().enumerate() {
        let out = tmp.path().join(format!("m{i}"));
        merge(&base, a, &out, &[]);
        for comp in ["unet", "text_encoder"] {
            close(&out.join(comp), &dir.join(s(&c["expected"], comp)), 1e-5);
        }
    }
    // kohya → kohya keeps every tensor (names, bytes) and the alphas.
    let same = SafetensorsFile::open(&back).unwrap();
    let orig = SafetensorsFile::open(&lora).unwrap();
    for t in orig.tensors() {
        let alt = t.name.replace("lora_te_text_model_", "lora_te_");
        let n = if same.info(&t.name).is_some() {
            t.name.clone()
        } else {
            alt
        };
        let m = same.info(&n).unwrap_or_else(|| panic!("no {}", t.name));
        assert_eq!(m.shape, t.shape, "{}", t.name);
        assert_eq!(
            same.read_f32(&n).unwrap(),
            orig.read_f32(&t.name).unwrap(),
            "{}",
            t.name
        );
    }
    // One component of a pipeline LoRA into that component alone.
    let out = tmp.path().join("unet-only");
    merge(&base.join("unet"), &lora, &out, &["--component", "unet"]);
    close(&out, &dir.join(s(&c["expected"], "unet")), 1e-5);
    let e = failed(&run(&[
        &"merge",
        &base.join("unet"),
        &lora,
        &"-o",
        &tmp.path().join("x"),
    ]));
    assert!(
        e.contains("--component") || e.contains("match no module"),
        "{e}"
    );
}

fn flux_case(name: &str) -> Value {
    common::case_in("flux", name)
}

#[test]
fn flux_kohya_loras_merge_into_bfl_and_diffusers_checkpoints() {
    let dir = fixtures("flux");
    let tmp = tempfile::tempdir().unwrap();
    for name in ["kohya_default", "kohya_qkv_linear1", "kohya_split_qkv"] {
        let c = flux_case(name);
        let lora = dir.join(s(&c, "lora"));
        let out = tmp.path().join(format!("{name}-bfl.safetensors"));
        merge(&dir.join("base_bfl.safetensors"), &lora, &out, &[]);
        close(&out, &dir.join(s(&c["expected"], "merged_bfl")), 1e-5);
        // Fused qkv / linear1 split exactly over diffusers' separate projections.
        let out = tmp.path().join(format!("{name}-d.safetensors"));
        merge(&dir.join("base_diffusers"), &lora, &out, &[]);
        close(&out, &dir.join(s(&c["expected"], "merged_diffusers")), 1e-5);
        // kohya → diffusers (with the diffusers base) → merge.
        let conv = tmp.path().join(format!("{name}-conv"));
        convert(
            &lora,
            "diffusers",
            &conv,
            &["--base", dir.join("base_diffusers").to_str().unwrap()],
        );
        let out = tmp.path().join(format!("{name}-conv.safetensors"));
        merge(&dir.join("base_diffusers"), &conv, &out, &[]);
        close(&out, &dir.join(s(&c["expected"], "merged_diffusers")), 1e-5);
        // … and back to kohya: the parts fuse again (rank Σrᵢ, exact) into the BFL names.
        let back = tmp.path().join(format!("{name}-back.safetensors"));
        convert(&conv, "kohya", &back, &[]);
        let out = tmp.path().join(format!("{name}-back-bfl.safetensors"));
        merge(&dir.join("base_bfl.safetensors"), &back, &out, &[]);
        close(&out, &dir.join(s(&c["expected"], "merged_bfl")), 1e-5);
    }
}

#[test]
fn flux_diffusers_lora_fuses_into_kohya_for_the_bfl_checkpoint() {
    let dir = fixtures("flux");
    let tmp = tempfile::tempdir().unwrap();
    let c = flux_case("diffusers_peft");
    let lora = dir.join("diffusers_peft/pytorch_lora_weights.safetensors");
    let out = tmp.path().join("d.safetensors");
    merge(&dir.join("base_diffusers"), &lora, &out, &[]);
    close(&out, &dir.join(s(&c["expected"], "merged_diffusers")), 1e-5);
    let k = tmp.path().join("k.safetensors");
    let notes = convert(&lora, "kohya", &k, &[]);
    assert!(notes.contains("fused"), "{notes}");
    let out = tmp.path().join("bfl.safetensors");
    merge(&dir.join("base_bfl.safetensors"), &k, &out, &[]);
    close(&out, &dir.join(s(&c["expected"], "merged_bfl")), 1e-5);
}

#[test]
fn formats_are_detected_from_content_and_forced_with_from() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(PathBuf, &str)] = &[
        (fixtures("mlx").join("lora_default/adapters"), "mlx"),
        (
            fixtures("lycoris").join("loha/adapter.safetensors"),
            "lycoris",
        ),
        (
            fixtures("kohya_sd").join("lycoris_lora/lora.safetensors"),
            "lycoris",
        ),
        (
            fixtures("flux").join("kohya_default/kohya_lora.safetensors"),
            "kohya",
        ),
        (
            fixtures("kohya_sd").join("diffusers_peft/pytorch_lora_weights.safetensors"),
            "diffusers",
        ),
        (fixtures("peft").join("llama_lora/adapter"), "peft"),
    ];
    for (p, f) in cases {
        let o = run(&[&"inspect", p, &"--json"]);
        ok(&o);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["format"], *f, "{}", p.display());
    }
    // A wrong --from is an error naming the format, not a misread.
    let e = failed(&run(&[
        &"merge",
        &fixtures("mlx").join("base"),
        &fixtures("lycoris").join("loha/adapter.safetensors"),
        &"--from",
        &"diffusers",
        &"-o",
        &tmp.path().join("x.safetensors"),
    ]));
    assert!(e.contains("diffusers"), "{e}");
}

#[test]
fn check_reads_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    // Clean adapters of every format pass (exit 0).
    for p in [
        fixtures("flux").join("kohya_default/kohya_lora.safetensors"),
        fixtures("lycoris").join("boft_rescale/adapter.safetensors"),
        fixtures("kohya_sd").join("diffusers_peft/pytorch_lora_weights.safetensors"),
        fixtures("mlx").join("lora_default/adapters"),
        fixtures("gguf").join("plain/adapter_f32.gguf"),
    ] {
        let o = run(&[&"check", &p, &"--format", &"json"]);
        ok(&o);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["findings"], serde_json::json!([]), "{}: {v}", p.display());
        assert_eq!(v["targets"].as_array().unwrap().len(), 1, "{}", p.display());
    }
    // A truncated GGUF: AK002, naming the tensor that runs past the end.
    let bytes = std::fs::read(fixtures("gguf").join("plain/adapter_f32.gguf")).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..3000]).unwrap();
    let o = run(&[&"check", &cut]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("AK002") && text.contains("blk.0"), "{text}");
    // A LyCORIS file checked against a base it was not trained on: its names do not resolve.
    let o = run(&[
        &"check",
        &fixtures("lycoris").join("loha/adapter.safetensors"),
        &"--base",
        &fixtures("mlx").join("base"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("AK020") && text.contains("match no module"),
        "{text}"
    );
}

#[test]
fn peft_round_trips_through_every_format() {
    // PEFT (rank_pattern, alpha_pattern) → X → PEFT. kohya, LyCORIS and diffusers hold every
    // module's scale, so the factors come back byte for byte; GGUF and mlx-lm have one alpha or
    // scale per file, so scales are baked into B and only the merge is the same.
    let peft = fixtures("peft").join("llama_lora/adapter");
    let base = fixtures("peft").join("bases/llama");
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference.safetensors");
    merge(&base, &peft, &reference, &[]);
    let orig = SafetensorsFile::open(peft.join("adapter_model.safetensors")).unwrap();
    for (to, ext, exact) in [
        ("kohya", ".safetensors", true),
        ("lycoris", ".safetensors", true),
        ("diffusers", "", true),
        ("gguf", ".gguf", false),
        ("mlx", "", false),
    ] {
        let x = tmp.path().join(format!("x-{to}{ext}"));
        convert(&peft, to, &x, &["--base", base.to_str().unwrap()]);
        let back = tmp.path().join(format!("back-{to}"));
        convert(&x, "peft", &back, &["--base", base.to_str().unwrap()]);
        let out = tmp.path().join(format!("m-{to}.safetensors"));
        merge(&base, &back, &out, &[]);
        let d = close(&out, &reference, 1e-6);
        if exact {
            assert_eq!(d, 0.0, "{to}: the merge of the round trip differs");
            let got = SafetensorsFile::open(back.join("adapter_model.safetensors")).unwrap();
            for t in orig.tensors() {
                let g = got
                    .info(&t.name)
                    .unwrap_or_else(|| panic!("{to}: no {}", t.name));
                assert_eq!(g.shape, t.shape, "{to}: {}", t.name);
                let mut a = vec![0u8; t.len as usize];
                let mut b = vec![0u8; g.len as usize];
                orig.read_bytes(&t.name, 0, &mut a).unwrap();
                got.read_bytes(&t.name, 0, &mut b).unwrap();
                assert_eq!(a, b, "{to}: {} changed", t.name);
            }
        }
    }
}

#[test]
fn flux_in_dims_and_text_encoder_merge_per_component() {
    // sd-scripts' in_dims modules (img_in, txt_in, time_in, …, which diffusers' loader drops
    // silently) and CLIP-L keys in one file: each component merged on its own with --component.
    let dir = fixtures("flux");
    let tmp = tempfile::tempdir().unwrap();
    let c = flux_case("kohya_in_dims_te1");
    let lora = dir.join(s(&c, "lora"));
    for (base, comp, want) in [
        (
            dir.join("base_bfl.safetensors"),
            "transformer",
            "merged_bfl",
        ),
        (
            dir.join("base_diffusers"),
            "transformer",
            "merged_diffusers",
        ),
        (dir.join("base_te1"), "text_encoder", "merged_te1"),
    ] {
        let out = tmp.path().join(format!("{want}.safetensors"));
        merge(&base, &lora, &out, &["--component", comp]);
        close(&out, &dir.join(s(&c["expected"], want)), 1e-5);
    }
    // Without --component the CLIP keys have nowhere to go in a transformer checkpoint.
    let e = failed(&run(&[
        &"merge",
        &dir.join("base_bfl.safetensors"),
        &lora,
        &"-o",
        &tmp.path().join("x.safetensors"),
    ]));
    assert!(
        e.contains("lora_te1_") && e.contains("base_bfl.safetensors"),
        "{e}"
    );
}

#[test]
fn sdxl_kohya_names_merge_into_a_diffusers_pipeline() {
    // sd-scripts trains SDXL on Stability's original UNet names (input_blocks_4_1_…); they are
    // resolved onto diffusers' down/mid/up blocks as diffusers' own loader maps them
    // (fixtures/kohya_sdxl: 147 modules, convs, up/downsamplers, time/label embeddings, two CLIPs).
    let dir = fixtures("kohya_sdxl");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    merge(&dir.join("base"), &dir.join("lora.safetensors"), &out, &[]);
    for comp in ["unet", "text_encoder", "text_encoder_2"] {
        close(
            &out.join(comp),
            &dir.join(format!("merged_{comp}.safetensors")),
            1e-5,
        );
    }
    // … and to diffusers' format and back: the same merge.
    let d = tmp.path().join("d");
    convert(
        &dir.join("lora.safetensors"),
        "diffusers",
        &d,
        &["--base", dir.join("base").to_str().unwrap()],
    );
    let out = tmp.path().join("m2");
    merge(&dir.join("base"), &d, &out, &[]);
    close(
        &out.join("unet"),
        &dir.join("merged_unet.safetensors"),
        1e-5,
    );
}

#[test]
fn fuzz_found_inputs_are_refused_cleanly() {
    // fixtures/fuzz-regressions/formats: inputs the fuzz targets (gguf_file, adapter_formats)
    // and hand-built cases turned up — 0-D factors, empty or huge dimensions, 64 BOFT stages,
    // integer GGUF factors. Each must be a clean error from every reader, never a panic or an
    // allocation the file does not back.
    let dir = fixtures("fuzz-regressions").join("formats");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            continue;
        }
        for cmd in ["inspect", "check"] {
            let o = run(&[&cmd, &p]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!err.contains("panicked"), "{cmd} {}: {err}", p.display());
            assert!(
                !o.status.success() || cmd == "check",
                "{cmd} {}: accepted",
                p.display()
            );
            assert!(o.status.code() != Some(101), "{cmd} {}: {err}", p.display());
        }
        n += 1;
    }
    assert_eq!(n, 13);
}
