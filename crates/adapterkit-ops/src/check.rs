//! `check`: a catalogue of rules with stable ids, run over adapters and safetensors files, for CI
//! gates. Every rule reads only what it needs: headers and configs always, adapter tensors for
//! the numeric rules, and of a base only its headers and config.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use adapterkit_core::ir::{Adapter, Payload};
use adapterkit_core::{DType, TensorSource};
use adapterkit_formats::safetensors::SafetensorsFile;
use adapterkit_formats::{peft, Checkpoint, Error as FormatError};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::plan::{self, OutDType, WeightedAdapter};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Probably wrong.
    Warning,
    /// Wrong: the file will fail or misbehave.
    Error,
}

impl Severity {
    /// `error`, `warning`, `info`.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One rule of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Stable id (`AK001`).
    pub id: &'static str,
    /// Short kebab-case name.
    pub name: &'static str,
    /// Default severity.
    pub severity: Severity,
    /// One line.
    pub summary: &'static str,
    /// Why it matters.
    pub rationale: &'static str,
}

/// Every rule, in id order.
pub const RULES: &[Rule] = &[
    Rule { id: "AK001", name: "file-unreadable", severity: Severity::Error, summary: "A file cannot be opened or read.", rationale: "Nothing else can be checked, and every consumer will fail on it too." },
    Rule { id: "AK002", name: "safetensors-invalid", severity: Severity::Error, summary: "A safetensors header or layout breaks a format rule (length, JSON, dtype, shape, offsets, holes, overlaps, trailing bytes).", rationale: "Readers differ in what they tolerate; a file that breaks a rule loads in one tool and not in another, or loads the wrong bytes." },
    Rule { id: "AK003", name: "duplicate-tensor", severity: Severity::Error, summary: "A tensor name appears twice in a safetensors header.", rationale: "JSON parsers keep either the first or the last entry, so two tools load different weights from the same file (Python's safetensors accepts it silently)." },
    Rule { id: "AK004", name: "pickled-weights", severity: Severity::Error, summary: "Weights are stored as a pickle (.bin/.pt) instead of safetensors.", rationale: "Unpickling runs arbitrary code; adapterkit never loads pickles." },
    Rule { id: "AK010", name: "config-invalid", severity: Severity::Error, summary: "adapter_config.json is missing, not JSON, not an object, lacks a required field or has a field of the wrong type.", rationale: "PEFT and every converter read the config first; a bad one makes the adapter unusable or misread." },
    Rule { id: "AK011", name: "config-unknown-field", severity: Severity::Warning, summary: "The config has a field no PEFT release defines for its peft_type.", rationale: "A typo (`lora_aplha`) is silently ignored by PEFT and the adapter then loads with the default; a field from a fork is lost." },
    Rule { id: "AK012", name: "config-needs-newer-peft", severity: Severity::Info, summary: "The config sets fields that only recent PEFT releases understand (the release that introduced each is named).", rationale: "Consumers on an older PEFT load the adapter without the feature (e.g. lora_bias, DoRA) or fail; the minimum version belongs in the model card." },
    Rule { id: "AK013", name: "unknown-peft-type", severity: Severity::Error, summary: "peft_type is not a type any PEFT release defines.", rationale: "No tool can interpret the tensors." },
    Rule { id: "AK014", name: "not-mergeable", severity: Severity::Info, summary: "The adapter is of a kind that cannot be folded into the weights (prompt learning, routers, …) or that adapterkit refuses to merge.", rationale: "It is valid, but it adds inference cost and `merge` will refuse it; the message says why." },
    Rule { id: "AK020", name: "config-tensor-mismatch", severity: Severity::Error, summary: "The config and the tensors disagree: a module without its tensors, an incomplete pair, a tensor with the wrong shape or dtype for its role.", rationale: "PEFT initialises missing tensors randomly or to zero and only warns; the adapter then does something other than what was trained." },
    Rule { id: "AK021", name: "rank-mismatch", severity: Severity::Error, summary: "r, rank_pattern or alpha-related ranks in the config disagree with the tensor shapes.", rationale: "The scale α/r is then computed from the wrong r: the adapter's effect is silently scaled." },
    Rule { id: "AK022", name: "unconsumed-tensor", severity: Severity::Error, summary: "A tensor in the file is used by no module.", rationale: "Either the config forgot a target (the update is silently dropped) or the file carries junk." },
    Rule { id: "AK030", name: "non-finite", severity: Severity::Error, summary: "A tensor holds NaN or infinity.", rationale: "One NaN in an adapter turns every merged weight it touches, and every activation downstream, into NaN." },
    Rule { id: "AK031", name: "zero-update", severity: Severity::Warning, summary: "A module's update is exactly zero (LoRA B all zeros, IA3 vector all ones): it was never trained.", rationale: "LoRA initialises B to zero; an adapter saved before training, or whose gradients never reached a module, does nothing there." },
    Rule { id: "AK032", name: "extreme-norm", severity: Severity::Warning, summary: "A module's update norm ‖ΔW‖ is more than 20× the median of the file's modules.", rationale: "A diverged module, a wrong alpha or a mis-scaled conversion usually shows as one module far larger than the rest." },
    Rule { id: "AK040", name: "mixed-dtypes", severity: Severity::Warning, summary: "Floating-point tensors of several dtypes in one file (e.g. fp32 tensors in an fp16 file).", rationale: "Usually an export bug (a cast that missed some tensors); it wastes space and may change results when consumers assume one dtype." },
    Rule { id: "AK041", name: "dtype-differs-from-base", severity: Severity::Info, summary: "The adapter's float dtype differs from the base's.", rationale: "Harmless for merging (adapterkit computes in f32), worth knowing when comparing with tools that merge in the adapter's dtype." },
    Rule { id: "AK050", name: "kohya-hash-mismatch", severity: Severity::Error, summary: "The file's sshs_model_hash (kohya sd-scripts) does not match the sha256 of its tensor data.", rationale: "The metadata describes other weights: the file was edited or truncated after it was hashed, and UIs that index by this hash show the wrong model." },
    Rule { id: "AK051", name: "modelspec-incomplete", severity: Severity::Warning, summary: "modelspec.sai_model_spec is declared but required modelspec fields are missing.", rationale: "Model browsers rely on modelspec.architecture, .implementation and .title to list and load the file." },
    Rule { id: "AK060", name: "target-not-in-base", severity: Severity::Error, summary: "With --base: a target module has no tensor in the base.", rationale: "The adapter was trained on another architecture or another size; merging it is impossible and PEFT would skip the module." },
    Rule { id: "AK061", name: "shape-differs-from-base", severity: Severity::Error, summary: "With --base: an update's shape differs from the base tensor's.", rationale: "The adapter was trained on another model of the same family (another width)." },
    Rule { id: "AK062", name: "vocab-differs-from-base", severity: Severity::Error, summary: "With --base: embedding or output-head tensors have another vocabulary size than the base.", rationale: "The tokenizer was resized for training; the base must be resized the same way first or token ids will not line up." },
    Rule { id: "AK063", name: "tied-embeddings", severity: Severity::Warning, summary: "With --base: the adapter changes the output head or the input embedding of a base whose two are tied.", rationale: "Merging into one changes the other (or is impossible when the head is not stored); the adapter was likely trained with untied weights." },
];

/// The rule with this id.
pub fn rule(id: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.id == id)
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Rule id.
    pub rule: &'static str,
    /// Severity (after overrides).
    pub severity: Severity,
    /// The file or directory concerned.
    pub path: PathBuf,
    /// The tensor or config field concerned, when there is one.
    pub item: Option<String>,
    /// What is wrong, with expected vs found.
    pub message: String,
}

/// What the checker looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A PEFT adapter directory.
    Adapter(PathBuf),
    /// A directory with pickled adapter weights and no safetensors.
    Pickled(PathBuf),
    /// A safetensors file.
    Safetensors(PathBuf),
    /// An adapter in another ecosystem's format: a kohya/LyCORIS/diffusers `.safetensors` file,
    /// a GGUF file or an mlx-lm directory.
    Foreign(PathBuf),
}

impl Target {
    /// The path.
    pub fn path(&self) -> &Path {
        match self {
            Target::Adapter(p)
            | Target::Pickled(p)
            | Target::Safetensors(p)
            | Target::Foreign(p) => p,
        }
    }
}

/// Find what to check under `path`: the path itself if it is an adapter directory or a
/// safetensors file, else every adapter directory and loose safetensors file below it (adapter
/// directories are not descended into). Depth is capped at 16 and symbolic links are not
/// followed.
pub fn discover(path: &Path) -> std::io::Result<Vec<Target>> {
    let mut out = Vec::new();
    walk(path, 0, &mut out)?;
    Ok(out)
}

fn walk(path: &Path, depth: usize, out: &mut Vec<Target>) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_file() {
        out.push(file_target(path));
        return Ok(());
    }
    if !meta.is_dir() || depth > 16 {
        return Ok(());
    }
    if adapterkit_formats::mlx::sniff(path) || adapterkit_formats::adapterhub::sniff(path) {
        out.push(Target::Foreign(path.to_path_buf()));
        return Ok(());
    }
    // An adapter directory (its weights without a config are still an adapter: AK010).
    if path.join("adapter_config.json").exists() || path.join("adapter_model.safetensors").is_file()
    {
        let has_st = path.join("adapter_model.safetensors").exists();
        let has_cfg = path.join("adapter_config.json").exists();
        let pickled = ["adapter_model.bin", "adapter_model.pt", "adapter_model.pth"]
            .iter()
            .any(|n| path.join(n).exists());
        out.push(if has_cfg && !has_st && pickled {
            Target::Pickled(path.to_path_buf())
        } else {
            Target::Adapter(path.to_path_buf())
        });
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        let m = std::fs::symlink_metadata(&e)?;
        if m.is_dir() {
            walk(&e, depth + 1, out)?;
        } else if m.is_file()
            && e.extension()
                .is_some_and(|x| x == "safetensors" || x == "gguf")
        {
            out.push(file_target(&e));
        }
    }
    Ok(())
}

/// A file: GGUF, a kohya/LyCORIS/diffusers adapter, or any other safetensors file.
fn file_target(path: &Path) -> Target {
    use adapterkit_formats::convert::{detect, AdapterFormat};
    if adapterkit_formats::gguf::GgufFile::sniff(path) {
        return Target::Foreign(path.to_path_buf());
    }
    match detect(path) {
        Ok(
            AdapterFormat::Kohya
            | AdapterFormat::Lycoris
            | AdapterFormat::Diffusers
            | AdapterFormat::Sparse,
        ) => Target::Foreign(path.to_path_buf()),
        _ => Target::Safetensors(path.to_path_buf()),
    }
}

/// PEFT's config fields and the release that introduced each (`formats/peft_config_fields.json`,
/// made from PEFT's git tags and wheels by `formats/peft_config_fields.py`).
struct FieldTable {
    base: HashMap<String, String>,
    by_type: HashMap<String, HashMap<String, String>>,
    removed: HashMap<String, HashMap<String, String>>,
    latest: String,
}

fn field_table() -> &'static FieldTable {
    static T: std::sync::OnceLock<FieldTable> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let v: Value =
            serde_json::from_str(include_str!("../../../formats/peft_config_fields.json"))
                .expect("formats/peft_config_fields.json is valid JSON");
        let pairs = |x: &Value| -> HashMap<String, String> {
            match x {
                Value::Array(a) => a
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p.get(0)?.as_str()?.to_string(),
                            p.get(1)?.as_str()?.to_string(),
                        ))
                    })
                    .collect(),
                Value::Object(o) => o
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect(),
                _ => HashMap::new(),
            }
        };
        let mut by_type = HashMap::new();
        let mut removed = HashMap::new();
        if let Some(t) = v["tuners"].as_object() {
            for (k, cfg) in t {
                by_type.insert(k.clone(), pairs(&cfg["fields"]));
                removed.insert(k.clone(), pairs(&cfg["removed"]));
            }
        }
        FieldTable {
            base: pairs(&v["base"]),
            by_type,
            removed,
            latest: v["latest_tag"].as_str().unwrap_or("?").to_string(),
        }
    })
}

/// Compare `vX.Y.Z` tags.
fn version_key(tag: &str) -> Vec<u64> {
    tag.trim_start_matches('v')
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// Whether a config value switches a feature on: `true` or a non-empty list or object. Numbers
/// and strings are not counted: PEFT writes non-trivial defaults of both (`qalora_group_size: 16`,
/// `megatron_core: "megatron.core"`) into every config.
fn switches_on(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

/// Collects findings for one target.
struct Sink<'a> {
    path: &'a Path,
    out: Vec<Finding>,
}

impl Sink<'_> {
    fn add(&mut self, rule: &'static str, item: Option<&str>, message: impl Into<String>) {
        let sev = self::rule(rule)
            .map(|r| r.severity)
            .unwrap_or(Severity::Error);
        self.out.push(Finding {
            rule,
            severity: sev,
            path: self.path.to_path_buf(),
            item: item.map(str::to_string),
            message: message.into(),
        });
    }
}

/// Whether a reader error is about a safetensors header or layout (AK002).
fn is_layout_error(e: &FormatError) -> bool {
    use FormatError as E;
    matches!(
        e,
        E::FileTooSmall { .. }
            | E::HeaderTooLarge { .. }
            | E::HeaderOutOfBounds { .. }
            | E::InvalidHeader { .. }
            | E::InvalidTensor { .. }
            | E::TensorSizeMismatch(_)
            | E::DataLayout { .. }
            | E::InvalidIndex { .. }
    )
}

/// Map a reader error onto the catalogue.
fn format_error(sink: &mut Sink, e: &FormatError) {
    use FormatError as E;
    match e {
        E::Io { .. } | E::NotFound { .. } => sink.add("AK001", None, e.to_string()),
        e if is_layout_error(e) => sink.add("AK002", None, e.to_string()),
        E::DuplicateTensor { tensor, .. } => sink.add("AK003", Some(tensor), e.to_string()),
        E::PickleRefused { .. } => sink.add("AK004", None, e.to_string()),
        E::Gguf { .. } => sink.add("AK002", None, e.to_string()),
        E::Format { .. } => sink.add("AK020", None, e.to_string()),
        E::InvalidConfig { .. } => sink.add("AK010", None, e.to_string()),
        E::UnknownPeftType { .. } => sink.add("AK013", None, e.to_string()),
        E::UnsupportedPeftType { .. } => sink.add("AK014", None, e.to_string()),
        E::InvalidAdapter { problems, .. } => {
            for p in problems {
                let rule = if p.contains("the config gives r=") || p.contains("rank mismatch") {
                    "AK021"
                } else if p.contains("not used by any module") {
                    "AK022"
                } else {
                    "AK020"
                };
                let item = p.split(':').next().filter(|s| !s.contains(' '));
                sink.add(rule, item, p.clone());
            }
        }
        other => sink.add("AK001", None, other.to_string()),
    }
}

/// Check one target. `base` enables the compatibility rules.
pub fn check_target(target: &Target, base: Option<&Checkpoint>) -> Vec<Finding> {
    let mut sink = Sink {
        path: target.path(),
        out: Vec::new(),
    };
    match target {
        Target::Safetensors(p) => check_safetensors(&mut sink, p),
        Target::Pickled(p) => sink.add(
            "AK004",
            None,
            format!(
                "{}: only pickled weights (adapter_model.bin/.pt); save the adapter with safe_serialization=True",
                p.display()
            ),
        ),
        Target::Adapter(p) => check_adapter(&mut sink, p, base),
        Target::Foreign(p) => check_foreign(&mut sink, p, base),
    }
    sink.out
}

/// Another ecosystem's adapter: read through its format (names resolved against the base when
/// one is given), then the same IR rules as a PEFT adapter. A GGUF model (not an adapter) gets
/// the container checks only.
fn check_foreign(sink: &mut Sink, path: &Path, base: Option<&Checkpoint>) {
    use adapterkit_formats::gguf::GgufFile;
    // An AdapterHub adapter: its file is checked whatever its parts; the IR rules apply when every
    // part is a weight update (bottleneck adapters, prefixes … are valid, just not mergeable).
    if path.is_dir() && adapterkit_formats::adapterhub::sniff(path) {
        match adapterkit_formats::adapterhub::describe(path) {
            Err(e) => return format_error(sink, &e),
            Ok((d, file)) => {
                let names: Vec<String> = file.tensors().iter().map(|t| t.name.clone()).collect();
                numeric_and_dtypes(sink, &*file, &names);
                if !d.parts.iter().all(|p| p.kind.mergeable()) {
                    return;
                }
            }
        }
    }
    if GgufFile::sniff(path) {
        match GgufFile::open(path) {
            Err(e) => return format_error(sink, &e),
            Ok(g) if !adapterkit_formats::gguf_lora::is_adapter(&g) => return,
            Ok(_) => {}
        }
    }
    let names = base.map(adapterkit_formats::base_names::BaseNames::from_checkpoint);
    match adapterkit_formats::convert::open(path, None, names.as_ref()) {
        Ok(pa) => {
            let config = serde_json::json!({});
            adapter_rules(sink, &pa.adapter, &config);
            if let Some(b) = base {
                base_rules(sink, &pa.adapter, &config, b);
            }
        }
        Err(e) => format_error(sink, &e),
    }
}

fn check_safetensors(sink: &mut Sink, path: &Path) {
    let file = match SafetensorsFile::open(path) {
        Ok(f) => f,
        Err(e) => {
            format_error(sink, &e);
            return;
        }
    };
    numeric_and_dtypes(
        sink,
        &file,
        &file
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect::<Vec<_>>(),
    );
    metadata_rules(sink, &file);
}

/// AK030 and AK040 over `names` of `src`.
fn numeric_and_dtypes(sink: &mut Sink, src: &dyn TensorSource, names: &[String]) {
    let mut dtypes: BTreeMap<DType, usize> = BTreeMap::new();
    for n in names {
        let Some(info) = src.info(n) else { continue };
        if !info.dtype.is_float() {
            continue;
        }
        *dtypes.entry(info.dtype).or_default() += 1;
        // Scanned in chunks: a model's embedding table need not be held in f32 at once.
        let Some(width) = info.dtype.byte_len(1).filter(|w| *w > 0) else {
            continue; // sub-byte floats: no per-element width
        };
        let per = (4 << 20) / width as usize;
        let (mut raw, mut vals) = (vec![0u8; per * width as usize], vec![0f32; per]);
        let (mut count, mut nan, mut first) = (0usize, 0usize, None);
        let numel = info.numel() as usize;
        let mut done = 0usize;
        let mut unreadable = false;
        while done < numel {
            let n_el = (numel - done).min(per);
            let bytes = &mut raw[..n_el * width as usize];
            if src.read_bytes(n, (done as u64) * width, bytes).is_err()
                || adapterkit_core::convert::decode_to_f32(info.dtype, bytes, &mut vals[..n_el])
                    .is_err()
            {
                unreadable = true;
                break;
            }
            // The all-finite case is one vectorised pass.
            if let Some((c, f)) = crate::kernels::non_finite(&vals[..n_el]) {
                count += c;
                nan += vals[..n_el].iter().filter(|x| x.is_nan()).count();
                first.get_or_insert(done + f);
            }
            done += n_el;
        }
        if unreadable {
            continue;
        }
        if let Some(first) = first {
            sink.add(
                "AK030",
                Some(n),
                format!(
                    "{count} non-finite value(s) ({nan} NaN, {} infinite) in {:?} {:?}; first at element {first}",
                    count - nan,
                    info.dtype,
                    info.shape
                ),
            );
        }
    }
    if dtypes.len() > 1 {
        let list: Vec<String> = dtypes.iter().map(|(d, c)| format!("{c}×{d}")).collect();
        sink.add(
            "AK040",
            None,
            format!(
                "floating-point tensors of {} dtypes: {}",
                dtypes.len(),
                list.join(", ")
            ),
        );
    }
}

/// kohya sd-scripts' `sshs_model_hash`: the sha256 of the data section that
/// `safetensors.torch.save` writes for the file's tensors, which orders them by dtype (the
/// safetensors dtype order, largest first) and then by name, back to back. For a file saved that
/// way it is the sha256 of everything after the header; computing it in the canonical order also
/// accepts the same tensors written by another tool in another order.
fn kohya_model_hash(file: &SafetensorsFile) -> adapterkit_core::Result<String> {
    let mut tensors: Vec<&adapterkit_core::TensorInfo> = file.tensors().iter().collect();
    tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for t in tensors {
        let mut off = 0u64;
        while off < t.len {
            let n = ((t.len - off) as usize).min(buf.len());
            file.read_bytes(&t.name, off, &mut buf[..n])?;
            h.update(&buf[..n]);
            off += n as u64;
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn metadata_rules(sink: &mut Sink, file: &SafetensorsFile) {
    let Some(meta) = file.metadata() else { return };
    let get = |k: &str| meta.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // LyCORIS writes "0x" + the sha256 of its tensors in the network's module order, which the
    // file does not record: that form cannot be verified from the file and is not checked.
    if let Some(want) = get("sshs_model_hash").filter(|h| !h.starts_with("0x")) {
        match kohya_model_hash(file) {
            Ok(got) if got.eq_ignore_ascii_case(want.trim()) => {}
            Ok(got) => sink.add(
                "AK050",
                Some("sshs_model_hash"),
                format!("metadata says {want} but the tensor data hashes to {got} (sha256 of the tensors' bytes in safetensors order, as sd-scripts computes it)"),
            ),
            Err(e) => sink.add("AK001", None, e.to_string()),
        }
    }
    if get("modelspec.sai_model_spec").is_some() {
        let missing: Vec<&str> = [
            "modelspec.architecture",
            "modelspec.implementation",
            "modelspec.title",
        ]
        .into_iter()
        .filter(|k| get(k).is_none_or(|v| v.trim().is_empty()))
        .collect();
        if !missing.is_empty() {
            sink.add(
                "AK051",
                Some("modelspec.sai_model_spec"),
                format!("declares modelspec but lacks {}", missing.join(", ")),
            );
        }
    }
}

fn check_config(sink: &mut Sink, dir: &Path) -> Option<Value> {
    let cfg_path = dir.join("adapter_config.json");
    let json = match adapterkit_formats::checkpoint::read_json(&cfg_path) {
        Ok(v) => v,
        Err(e) => {
            let rule = if matches!(e, FormatError::Io { .. } | FormatError::NotFound { .. }) {
                "AK001"
            } else {
                "AK010"
            };
            sink.add(rule, Some("adapter_config.json"), e.to_string());
            return None;
        }
    };
    let Some(obj) = json.as_object() else {
        sink.add("AK010", Some("adapter_config.json"), "not a JSON object");
        return None;
    };
    let Some(peft_type) = obj.get("peft_type").and_then(Value::as_str) else {
        sink.add(
            "AK010",
            Some("peft_type"),
            "missing required field peft_type (a string)",
        );
        return None;
    };
    let table = field_table();
    let Some(fields) = table.by_type.get(peft_type) else {
        // AK013 comes from the reader with the list of known types.
        return Some(json);
    };
    let mut newer: Vec<(String, String)> = Vec::new();
    for (k, v) in obj {
        let introduced = fields.get(k).or_else(|| table.base.get(k));
        match introduced {
            Some(tag) => {
                if switches_on(v) && version_key(tag) >= version_key("v0.7.0") {
                    newer.push((k.clone(), tag.clone()));
                }
            }
            None => {
                let msg = match table.removed.get(peft_type).and_then(|r| r.get(k)) {
                    Some(last) => format!("field {k:?} was removed from {peft_type} configs after PEFT {last}; current PEFT ignores it"),
                    None => format!("field {k:?} is not a {peft_type} config field in any PEFT release up to {}; PEFT ignores it (a typo?)", table.latest),
                };
                sink.add("AK011", Some(k), msg);
            }
        }
    }
    if !newer.is_empty() {
        newer.sort_by_key(|(_, t)| std::cmp::Reverse(version_key(t)));
        let list: Vec<String> = newer
            .iter()
            .map(|(k, t)| format!("{k} (PEFT {t})"))
            .collect();
        sink.add(
            "AK012",
            None,
            format!(
                "needs PEFT ≥ {} for: {}",
                newer[0].1.trim_start_matches('v'),
                list.join(", ")
            ),
        );
    }
    Some(json)
}

/// `‖scale·B·A‖_F` of a LoRA module from its factors, without forming `B·A`:
/// `‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)`.
fn low_rank_norm(b: &[f32], a: &[f32], r: usize, scale: f64) -> f64 {
    if r == 0 {
        return 0.0;
    }
    let (rows, cols) = (b.len() / r, a.len() / r);
    let mut btb = vec![0f64; r * r];
    for i in 0..rows {
        let row = &b[i * r..(i + 1) * r];
        for p in 0..r {
            for q in 0..r {
                btb[p * r + q] += row[p] as f64 * row[q] as f64;
            }
        }
    }
    let mut total = 0.0;
    for p in 0..r {
        for q in 0..r {
            let dot: f64 = a[p * cols..(p + 1) * cols]
                .iter()
                .zip(&a[q * cols..(q + 1) * cols])
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum();
            total += btb[p * r + q] * dot;
        }
    }
    scale.abs() * total.max(0.0).sqrt()
}

fn adapter_rules(sink: &mut Sink, ad: &Adapter, config: &Value) {
    // Consumption (AK022): every tensor used by some module.
    let mut uses: HashMap<&str, usize> = ad.tensor_names.iter().map(|n| (n.as_str(), 0)).collect();
    for m in &ad.modules {
        for t in m.payload.tensors() {
            if let Some(c) = uses.get_mut(t) {
                *c += 1;
            }
        }
    }
    let mut unused: Vec<&&str> = uses
        .iter()
        .filter(|(_, c)| **c == 0)
        .map(|(n, _)| n)
        .collect();
    unused.sort();
    for n in unused {
        sink.add(
            "AK022",
            Some(n),
            "not used by any module of the config (a target missing from target_modules, or junk)",
        );
    }
    // Whole tensors in a LoRA-family file must be modules_to_save or saved embedding layers;
    // anything else is a tensor PEFT reports as unexpected and ignores. (Sparse differences
    // hold densely tuned tensors whole by design.)
    if ad.method != "LN_TUNING" && ad.method != "SPARSE" {
        let saved: Vec<String> = config
            .get("modules_to_save")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for m in &ad.modules {
            if let Payload::Replace { tensor } = &m.payload {
                let listed = saved
                    .iter()
                    .any(|s| m.module == *s || m.module.ends_with(&format!(".{s}")));
                if !listed && !tensor.contains(".base_layer.") {
                    sink.add("AK022", Some(tensor), format!("a whole tensor for {}, which is neither under modules_to_save nor a saved embedding layer: PEFT reports it as unexpected and ignores it", m.target));
                }
            }
        }
    }
    numeric_and_dtypes(sink, ad.tensors.as_ref(), &ad.tensor_names);
    // Zero updates (AK031) and norms (AK032).
    let mut norms: Vec<(String, f64)> = Vec::new();
    for m in &ad.modules {
        match &m.payload {
            Payload::LowRank(lr) => {
                let (Ok(a), Ok(b)) = (ad.tensors.read_f32(&lr.a), ad.tensors.read_f32(&lr.b))
                else {
                    continue;
                };
                // A rank-0 module (AdaLoRA prunes some to nothing) is empty by design.
                if lr.rank == 0 {
                    continue;
                }
                if b.iter().all(|x| *x == 0.0) || a.iter().all(|x| *x == 0.0) {
                    let which = if b.iter().all(|x| *x == 0.0) {
                        &lr.b
                    } else {
                        &lr.a
                    };
                    sink.add("AK031", Some(which), format!("module {}: {which} is all zeros, so the module's update is zero (never trained?)", m.module));
                    continue;
                }
                if lr.singular_values.is_none() && a.iter().chain(&b).all(|x| x.is_finite()) {
                    norms.push((
                        m.module.clone(),
                        low_rank_norm(&b, &a, lr.rank as usize, lr.scale),
                    ));
                }
            }
            Payload::Scale { tensor, .. } => {
                if let Ok(v) = ad.tensors.read_f32(tensor) {
                    if v.iter().all(|x| *x == 1.0) {
                        sink.add("AK031", Some(tensor), format!("module {}: the scaling vector is all ones, so the module changes nothing (never trained?)", m.module));
                    }
                }
            }
            _ => {}
        }
    }
    if norms.len() >= 3 {
        let mut sorted: Vec<f64> = norms.iter().map(|(_, n)| *n).collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        if median > 0.0 {
            for (module, n) in &norms {
                if *n > 20.0 * median {
                    sink.add("AK032", Some(module), format!("‖ΔW‖_F = {n:.4e} is {:.0}× the median {median:.4e} of the file's {} LoRA modules", n / median, norms.len()));
                }
            }
        }
    }
    if let Ok(file) = SafetensorsFile::open(&ad.path) {
        metadata_rules(sink, &file);
    }
}

fn base_rules(sink: &mut Sink, ad: &Adapter, config: &Value, base: &Checkpoint) {
    let mut ad = ad.clone();
    let model_type = base
        .config()
        .and_then(|c| c.get("model_type"))
        .and_then(Value::as_str);
    plan::conv1d_layout(&mut ad, model_type);
    let ad = &ad;
    let p = plan::plan(
        base.root(),
        base,
        base.tensors(),
        vec![WeightedAdapter {
            adapter: ad.clone(),
            weight: 1.0,
        }],
        OutDType::Auto,
    );
    let vocab = base
        .config()
        .and_then(|c| c.get("vocab_size"))
        .and_then(Value::as_u64);
    if let Err(crate::Error::Validation(problems)) = p {
        for pr in problems {
            let embed = pr.tensor.contains("embed")
                || pr.tensor.contains("lm_head")
                || pr.tensor.contains("wte");
            let rule = if pr.message.contains("not used by any module") {
                // Already AK022 without the base.
                continue;
            } else if pr.message.contains("does not have") {
                if pr.message.contains("tied") {
                    "AK063"
                } else {
                    "AK060"
                }
            } else if pr.message.contains("shape mismatch") {
                if embed {
                    "AK062"
                } else {
                    "AK061"
                }
            } else {
                "AK020"
            };
            let msg = match (rule, vocab) {
                ("AK062", Some(v)) => format!(
                    "{} (the base's vocab_size is {v}: was the tokenizer resized?)",
                    pr.message
                ),
                _ => pr.message.clone(),
            };
            sink.add(rule, Some(&pr.tensor), msg);
        }
    }
    // Modules the config selects in the base but the file has no tensors for: PEFT injects them
    // untrained (and warns about missing keys).
    if ad.method == "LORA" {
        if let Ok(cfg) = peft::LoraConfig::from_json(&ad.path, config) {
            let have: std::collections::HashSet<&str> =
                ad.modules.iter().map(|m| m.module.as_str()).collect();
            let mut missing = Vec::new();
            for t in base.tensors() {
                let Some(module) = t.name.strip_suffix(".weight") else {
                    continue;
                };
                let (dims, embedding) =
                    (t.shape.len(), crate::deltas::looks_like_embedding(module));
                if !(dims == 2 || dims == 4) || have.contains(module) {
                    continue;
                }
                if cfg.selects(module, dims == 2 && !embedding) {
                    missing.push(module.to_string());
                }
            }
            if !missing.is_empty() {
                let n = missing.len();
                let shown: Vec<String> = missing.into_iter().take(5).collect();
                sink.add(
                    "AK020",
                    Some("target_modules"),
                    format!(
                        "target_modules selects {n} module(s) of the base that the file has no tensors for ({}{}): PEFT would inject them untrained",
                        shown.join(", "),
                        if n > 5 { ", …" } else { "" }
                    ),
                );
            }
        }
    }
    // Tied embeddings: changing either side changes both.
    let tied = base
        .config()
        .and_then(|c| c.get("tie_word_embeddings"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if tied {
        for m in &ad.modules {
            let t = &m.target;
            if (t.contains("embed_tokens") || t.contains("wte") || t.ends_with("lm_head.weight"))
                && base.info(t).is_some()
            {
                sink.add("AK063", Some(t), format!("module {} changes {t}, but the base ties its input embeddings and output head (tie_word_embeddings): merging changes both", m.module));
            }
        }
    }
    // Dtypes (AK041).
    let base_float: BTreeMap<DType, usize> =
        base.tensors()
            .filter(|t| t.dtype.is_float())
            .fold(BTreeMap::new(), |mut m, t| {
                *m.entry(t.dtype).or_default() += 1;
                m
            });
    let ad_float: BTreeMap<DType, usize> = ad
        .tensor_names
        .iter()
        .filter_map(|n| ad.tensors.info(n))
        .filter(|t| t.dtype.is_float())
        .fold(BTreeMap::new(), |mut m, t| {
            *m.entry(t.dtype).or_default() += 1;
            m
        });
    let main = |m: &BTreeMap<DType, usize>| m.iter().max_by_key(|(_, c)| **c).map(|(d, _)| *d);
    if let (Some(bd), Some(ad_d)) = (main(&base_float), main(&ad_float)) {
        if bd != ad_d {
            sink.add(
                "AK041",
                None,
                format!("adapter tensors are mostly {ad_d}, the base's {bd}"),
            );
        }
    }
}

fn check_adapter(sink: &mut Sink, dir: &Path, base: Option<&Checkpoint>) {
    let Some(config) = check_config(sink, dir) else {
        return;
    };
    match peft::open(dir) {
        Ok(pa) => {
            adapter_rules(sink, &pa.adapter, &config);
            if let Some(b) = base {
                base_rules(sink, &pa.adapter, &config, b);
            }
        }
        Err(e) => {
            format_error(sink, &e);
            // The safetensors file may still be worth the integrity and numeric rules.
            let st = dir.join("adapter_model.safetensors");
            let header_error =
                is_layout_error(&e) || matches!(e, FormatError::DuplicateTensor { .. });
            if !header_error && st.is_file() {
                // Header problems were reported by the reader already.
                let mut extra = Sink {
                    path: sink.path,
                    out: Vec::new(),
                };
                check_safetensors(&mut extra, &st);
                sink.out.extend(
                    extra
                        .out
                        .into_iter()
                        .filter(|f| !matches!(f.rule, "AK001" | "AK002" | "AK003")),
                );
            }
        }
    }
}
