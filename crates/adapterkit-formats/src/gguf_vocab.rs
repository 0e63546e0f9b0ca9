//! A Hugging Face tokenizer as GGUF `tokenizer.ggml.*` metadata, the way llama.cpp's
//! `convert_hf_to_gguf.py` writes it for the Llama family:
//!
//! - SentencePiece (`tokenizer.model`): model `llama`, pre `default`, every piece with its score
//!   and type, `added_tokens.json` and `tokenizer_config.json`'s `added_tokens_decoder` on top,
//!   padded to the model's vocabulary size with `[PAD{i}]`.
//! - Byte-level BPE (`tokenizer.json`): model `gpt2`, the vocabulary, merges, and a pre-tokenizer
//!   name. llama.cpp identifies the pre-tokenizer by hashing the token ids of a test string, which
//!   needs the tokenizer running; here it is identified by the pre-tokenizer's own definition (its
//!   split regex), for the definitions of Llama 3 (`llama-bpe`), Qwen2 (`qwen2`) and GPT-2
//!   (`gpt-2`). Any other is refused with the regex named.
//! - Then the special tokens (`bos`, `eos`, `unk`, `sep`, `pad`, `cls`, `mask`) from
//!   `tokenizer_config.json` matched against the added tokens, then `config.json`'s
//!   `*_token_id`; `add_bos_token`/`add_eos_token`; the chat template.

use std::path::Path;

use serde_json::Value as Json;

use crate::gguf::{Value, ValueType};
use crate::{Error, Result};

// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| err(path, format!("not valid JSON: {e}")))
}

/// One SentencePiece piece.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The text.
    pub piece: String,
    /// Its score.
    pub score: f32,
    /// SentencePiece's type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub kind: i32,
}

fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Skip one protobuf field of wire type `wt`.
fn skip(b: &[u8], pos: &mut usize, wt: u64) -> Option<()> {
    match wt {
        0 => {
            varint(b, pos)?;
        }
        1 => *pos = pos.checked_add(8).filter(|p| *p <= b.len())?,
        2 => {
            let n = varint(b, pos)? as usize;
            *pos = pos.checked_add(n).filter(|p| *p <= b.len())?;
        }
        5 => *pos = pos.checked_add(4).filter(|p| *p <= b.len())?,
        _ => return None,
    }
    Some(())
}

/// The pieces of a SentencePiece `ModelProto` (field 1: pieces; each piece: 1 text, 2 score,
/// 3 type).
pub fn sentencepiece_pieces(bytes: &[u8]) -> Option<Vec<Piece>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        let key = varint(bytes, &mut pos)?;
        let (field, wt) = (key >> 3, key & 7);
        if field != 1 || wt != 2 {
            skip(bytes, &mut pos, wt)?;
            continue;
        }
        let n = varint(bytes, &mut pos)? as usize;
        let end = pos.checked_add(n).filter(|e| *e <= bytes.len())?;
        let msg = &bytes[pos..end];
        pos = end;
        let mut p = Piece {
            piece: String::new(),
            score: 0.0,
            kind: NORMAL,
        };
        let mut q = 0;
        while q < msg.len() {
            let key = varint(msg, &mut q)?;
            match (key >> 3, key & 7) {
                (1, 2) => {
                    let n = varint(msg, &mut q)? as usize;
                    let e = q.checked_add(n).filter(|e| *e <= msg.len())?;
                    p.piece = String::from_utf8(msg[q..e].to_vec()).ok()?;
                    q = e;
                }
                (2, 5) => {
                    p.score = f32::from_le_bytes(msg.get(q..q + 4)?.try_into().ok()?);
                    q += 4;
                }
                (3, 0) => p.kind = varint(msg, &mut q)? as i32,
                (_, wt) => skip(msg, &mut q, wt)?,
            }
        }
        out.push(p);
    }
    Some(out)
}

/// Added tokens that look like control tokens even when not marked special
/// (`does_token_look_special`).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The tokenizer of the model in `dir` as GGUF metadata, for a vocabulary of `vocab_size`
/// (`config.json`'s, which may exceed the tokenizer's) and llama.cpp architecture `arch`.
pub fn tokenizer_metadata(
    dir: &Path,
    vocab_size: usize,
    arch: &str,
) -> Result<Vec<(String, Value)>> {
    let mut kv: Vec<(String, Value)> = Vec::new();
    let tc = read_json(&dir.join("tokenizer_config.json"))?;
    // Only the llama converter reads add_prefix_space.
    if let Some(b) = tc
        .as_ref()
        .filter(|_| arch == "llama")
        .and_then(|c| c.get("add_prefix_space"))
        .and_then(Json::as_bool)
    {
        kv.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(b)));
    }
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?;
    let spm = dir.join("tokenizer.model");
    let n_tokens;
    let mut merges: Option<Vec<String>> = None;
    if spm.is_file() {
        let bytes = std::fs::read(&spm).map_err(|source| Error::Io {
            path: spm.clone(),
            source,
        })?;
        let pieces = sentencepiece_pieces(&bytes).ok_or_else(|| {
            err(
                &spm,
                "not a SentencePiece model (protobuf could not be read)",
            )
        })?;
        let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
        let mut scores = vec![-10000f32; vocab_size];
        let mut types = vec![UNUSED; vocab_size];
        for (id, p) in pieces.iter().enumerate().take(vocab_size) {
            tokens[id] = p.piece.clone();
            scores[id] = p.score;
            types[id] = match p.kind {
                2 => UNKNOWN,
                3 => CONTROL,
                5 => UNUSED,
                6 => BYTE,
                _ => NORMAL,
            };
        }
        if let Some(Json::Object(added)) = read_json(&dir.join("added_tokens.json"))? {
            for (text, id) in added {
                if let Some(id) = id.as_u64().map(|i| i as usize).filter(|i| *i < vocab_size) {
                    tokens[id] = text;
                    scores[id] = -1000.0;
                    types[id] = USER_DEFINED;
                }
            }
        }
        if let Some(Json::Object(dec)) = tc.as_ref().and_then(|c| c.get("added_tokens_decoder")) {
            for (id, data) in dec {
                let Some(id) = id.parse::<usize>().ok().filter(|i| *i < vocab_size) else {
                    continue;
                };
                let Some(content) = data.get("content").and_then(Json::as_str) else {
                    continue;
                };
                let special = data.get("special").and_then(Json::as_bool) == Some(true);
                if special || looks_special(content) {
                    types[id] = CONTROL;
                    tokens[id] = content.to_string();
                } else {
                    types[id] = USER_DEFINED;
                    tokens[id] = content.replace('\u{2581}', " ");
                }
                scores[id] = -1000.0;
            }
        }
        n_tokens = tokens.len();
        kv.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        kv.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        kv.push(strings("tokenizer.ggml.tokens", tokens));
        kv.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
        ));
        kv.push(ints("tokenizer.ggml.token_type", types));
    } else if let Some(tj) = &tj {
        let model = tj.get("model").cloned().unwrap_or(Json::Null);
        let mtype = model.get("type").and_then(Json::as_str).unwrap_or("");
        if mtype != "BPE" {
            return Err(err(
                &tj_path,
                format!("tokenizer model {mtype:?}: adapterkit converts SentencePiece (tokenizer.model) and byte-level BPE tokenizers"),
            ));
        }
        let metaspace = tj.get("pre_tokenizer").is_none_or(Json::is_null)
            && model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
        if metaspace {
            return Err(err(
                &tj_path,
                "a SentencePiece-style BPE tokenizer.json (byte fallback, no byte-level pre-tokenizer) without tokenizer.model: llama.cpp converts it through its Hugging Face vocabulary path, which this version does not implement; put the model's tokenizer.model beside it",
            ));
        }
        let pre = bpe_pre(tj).map_err(|m| err(&tj_path, m))?;
        let mut by_id: Vec<Option<String>> = vec![None; vocab_size];
        let vocab = model
            .get("vocab")
            .and_then(Json::as_object)
            .ok_or_else(|| err(&tj_path, "model.vocab is missing"))?;
        for (tok, id) in vocab {
            let id = id.as_u64().unwrap_or(u64::MAX) as usize;
            if id >= vocab_size {
                return Err(err(
                    &tj_path,
                    format!(
                        "token {tok:?} has id {id}, beyond the model's vocab_size {vocab_size}"
                    ),
                ));
            }
            by_id[id] = Some(tok.clone());
        }
        let mut types = vec![NORMAL; vocab_size];
        for a in tj
            .get("added_tokens")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(content)) = (
                a.get("id").and_then(Json::as_u64).map(|i| i as usize),
                a.get("content").and_then(Json::as_str),
            ) else {
                continue;
            };
            if id >= vocab_size {
                return Err(err(
                    &tj_path,
                    format!("added token {content:?} has id {id}, beyond vocab_size {vocab_size}"),
                ));
            }
            let special = a.get("special").and_then(Json::as_bool) == Some(true);
            if special || looks_special(content) {
                types[id] = CONTROL;
                by_id[id] = Some(content.to_string());
            } else {
                types[id] = USER_DEFINED;
                by_id[id] = Some(content.replace('\u{2581}', " "));
            }
        }
        let tokens: Vec<String> = by_id
            .into_iter()
            .enumerate()
            .map(|(i, t)| match t {
                Some(t) => t,
                None => {
                    types[i] = UNUSED;
                    format!("[PAD{i}]")
                }
            })
            .collect();
        n_tokens = tokens.len();
        kv.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        kv.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        kv.push(strings("tokenizer.ggml.tokens", tokens));
        kv.push(ints("tokenizer.ggml.token_type", types));
        merges = Some(
            model
                .get("merges")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| match m {
                    Json::String(s) => Some(s.clone()),
                    // Pairs (transformers ≥ 4.45); spaces inside become U+0120 as llama.cpp does.
                    Json::Array(p) if p.len() == 2 => {
                        let part = |v: &Json| v.as_str().map(|s| s.replace(' ', "\u{0120}"));
                        Some(format!("{} {}", part(&p[0])?, part(&p[1])?))
                    }
                    _ => None,
                })
                .collect(),
        );
    } else {
        return Err(err(
            dir,
            "no tokenizer: llama.cpp needs tokenizer.model (SentencePiece) or tokenizer.json beside the weights",
        ));
    }
    if let Some(m) = merges {
        kv.push(strings("tokenizer.ggml.merges", m));
    }
    special_tokens(dir, tj.as_ref(), tc.as_ref(), n_tokens, &mut kv)?;
    Ok(kv)
}

fn strings(key: &str, v: Vec<String>) -> (String, Value) {
    (
        key.into(),
        Value::Array(
            ValueType::String,
            v.into_iter().map(Value::String).collect(),
        ),
    )
}

fn ints(key: &str, v: Vec<i32>) -> (String, Value) {
    (
        key.into(),
        Value::Array(ValueType::I32, v.into_iter().map(Value::I32).collect()),
    )
}

/// The llama.cpp pre-tokenizer name for a byte-level BPE `tokenizer.json`.
fn bpe_pre(tj: &Json) -> std::result::Result<&'static str, String> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let pre = tj.get("pre_tokenizer").cloned().unwrap_or(Json::Null);
    let parts: Vec<Json> = match pre.get("type").and_then(Json::as_str) {
        Some("Sequence") => pre
            .get("pretokenizers")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default(),
        Some(_) => vec![pre.clone()],
        None => Vec::new(),
    };
    let mut regex = None;
    let mut byte_level_regex = false;
    for p in &parts {
        match p.get("type").and_then(Json::as_str) {
            Some("Split") => {
                regex = p
                    .get("pattern")
                    .and_then(|x| x.get("Regex"))
                    .and_then(Json::as_str)
                    .map(str::to_string)
            }
            Some("ByteLevel") => {
                byte_level_regex = p.get("use_regex").and_then(Json::as_bool) != Some(false)
            }
            _ => {}
        }
    }
    match regex.as_deref() {
        Some(LLAMA3) => Ok("llama-bpe"),
        Some(QWEN2) => Ok("qwen2"),
        None if byte_level_regex => Ok("gpt-2"),
        Some(r) => Err(format!(
            "pre-tokenizer regex {r:?} is not one adapterkit recognises (Llama 3, Qwen2, GPT-2); llama.cpp would need its name"
        )),
        None => Err(format!(
            "pre-tokenizer {pre}: not one adapterkit recognises (Llama 3, Qwen2, GPT-2)"
        )),
    }
}

fn special_tokens(
    dir: &Path,
    tj: Option<&Json>,
    tc: Option<&Json>,
    n_vocab: usize,
    kv: &mut Vec<(String, Value)>,
) -> Result<()> {
    const TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];
    let mut ids: Vec<(&str, u32)> = Vec::new();
    let set = |typ: &'static str, id: Option<i64>, ids: &mut Vec<(&str, u32)>| {
        if let Some(id) = id {
            if id >= 0 && (id as usize) < n_vocab && !ids.iter().any(|(t, _)| *t == typ) {
                ids.push((typ, id as u32));
            }
        }
    };
    let content = |typ: &str| -> Option<String> {
        match tc?.get(format!("{typ}_token"))? {
            Json::String(s) => Some(s.clone()),
            Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let (special_bos, special_cls) = (content("bos").or(content("cls")), content("cls"));
    let mut special_eos = content("eos").or(content("sep"));
    let special_sep = content("sep");
    // add_{bos,eos,sep}_token from the post-processor, as gguf-py reads it (insertion order kept).
    let mut add: Vec<(&str, bool)> = Vec::new();
    fn put<'k>(add: &mut Vec<(&'k str, bool)>, typ: &'k str, v: bool, overwrite: bool) {
        match add.iter_mut().find(|(t, _)| *t == typ) {
            Some(e) if overwrite => e.1 = v,
            Some(_) => {}
            None => add.push((typ, v)),
        }
    }
    let sp = |x: &Json| -> Option<String> {
        x.get("SpecialToken")?
            .get("id")?
            .as_str()
            .map(str::to_string)
    };
    if let Some(pp) = tj
        .and_then(|t| t.get("post_processor"))
        .filter(|p| !p.is_null())
    {
        let procs: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
            Some(a) => a.iter().collect(),
            None => vec![pp],
        };
        for p in procs {
            match p.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    put(&mut add, "bos", false, false);
                    put(&mut add, "eos", false, false);
                }
                Some("RobertaProcessing") => {
                    put(&mut add, "bos", true, true);
                    put(&mut add, "eos", true, true);
                    put(&mut add, "sep", true, true);
                }
                Some("TemplateProcessing") => {
                    let single = p
                        .get("single")
                        .and_then(Json::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let pair = p
                        .get("pair")
                        .and_then(Json::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let (mut first, mut last) = (None, None);
                    if single.len() > 1 {
                        first = sp(&single[0]);
                        if let Some(f) = &first {
                            let known =
                                special_bos.as_ref() == Some(f) || special_cls.as_ref() == Some(f);
                            put(&mut add, "bos", known || special_bos.is_none(), true);
                        }
                        last = sp(&single[single.len() - 1]);
                        if let Some(l) = &last {
                            special_eos = Some(l.clone());
                            put(&mut add, "eos", true, true);
                        }
                    }
                    if !pair.is_empty() {
                        let start = usize::from(first.is_some() && sp(&pair[0]) == first);
                        let stop = if last.is_some() && sp(&pair[pair.len() - 1]) == last {
                            pair.len() - 1
                        } else {
                            pair.len()
                        };
                        let sub = &pair[start.min(stop)..stop];
                        let seq = |x: &Json| {
                            x.get("Sequence")
                                .and_then(|s| s.get("id"))
                                .and_then(Json::as_str)
                                .map(str::to_string)
                        };
                        if sub.len() > 2
                            && seq(&sub[0]).as_deref() == Some("A")
                            && seq(&sub[sub.len() - 1]).as_deref() == Some("B")
                        {
                            let mid = &sub[1..sub.len() - 1];
                            let is_sep = |e: &Option<String>| {
                                e.is_some() && (*e == special_sep || *e == special_eos)
                            };
                            let mut add_sep = is_sep(&sp(&mid[0])) && last.is_none();
                            if mid.len() == 2 && is_sep(&sp(&mid[1])) {
                                add_sep = true;
                            }
                            put(&mut add, "sep", add_sep, true);
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let added: Vec<(String, i64)> = tj
        .and_then(|t| t.get("added_tokens"))
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some((
                a.get("content")?.as_str()?.to_string(),
                a.get("id")?.as_i64()?,
            ))
        })
        .collect();
    let mut template = None;
    if let Some(tc) = tc {
        template = tc.get("chat_template").cloned();
        for typ in TYPES {
            if let Some(b) = tc.get(format!("add_{typ}_token")).and_then(Json::as_bool) {
                put(&mut add, typ, b, false);
            }
            let content = match tc.get(format!("{typ}_token")) {
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Object(o)) => {
                    o.get("content").and_then(Json::as_str).map(str::to_string)
                }
                _ => None,
            };
            if let Some(c) = content {
                let id = added.iter().find(|(t, _)| *t == c).map(|(_, i)| *i);
                set(typ, id, &mut ids);
            }
        }
    }
    if template.is_none() {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            template = std::fs::read_to_string(&jinja).ok().map(Json::String);
        } else if let Some(j) = read_json(&dir.join("chat_template.json"))? {
            template = j.get("chat_template").cloned();
        }
    }
    if let Some(cfg) = read_json(&dir.join("config.json"))? {
        for typ in TYPES {
            let v = cfg.get(format!("{typ}_token_id")).or_else(|| {
                cfg.get("text_config")
                    .and_then(|t| t.get(format!("{typ}_token_id")))
            });
            set(typ, v.and_then(Json::as_i64), &mut ids);
        }
    }
    // gguf-py's key names (sic "seperator"); it has no key for cls and skips it.
    let key = |typ: &str| match typ {
        "pad" => Some("padding"),
        "sep" => Some("seperator"),
        "unk" => Some("unknown"),
        "bos" => Some("bos"),
        "eos" => Some("eos"),
        "mask" => Some("mask"),
        _ => None,
    };
    for (typ, id) in ids {
        if let Some(k) = key(typ) {
            kv.push((format!("tokenizer.ggml.{k}_token_id"), Value::U32(id)));
        }
    }
    for (typ, b) in add {
        if matches!(typ, "bos" | "eos" | "sep") {
            kv.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(b)));
        }
    }
    match template {
        Some(Json::String(s)) => kv.push(("tokenizer.chat_template".into(), Value::String(s))),
        Some(Json::Array(list)) => {
            for t in list {
                let (Some(name), Some(body)) = (
                    t.get("name").and_then(Json::as_str),
                    t.get("template").and_then(Json::as_str),
                ) else {
                    continue;
                };
                let k = if name == "default" {
                    "tokenizer.chat_template".to_string()
                } else {
                    format!("tokenizer.chat_template.{name}")
                };
                kv.push((k, Value::String(body.to_string())));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_pieces() {
        // One piece: text "ab", score -1.5, type 3 (control); plus an unknown field 2 to skip.
        let mut piece = vec![0x0a, 2, b'a', b'b', 0x15];
        piece.extend_from_slice(&(-1.5f32).to_le_bytes());
        piece.extend_from_slice(&[0x18, 3]);
        let mut model = vec![0x0a, piece.len() as u8];
        model.extend_from_slice(&piece);
        model.extend_from_slice(&[0x12, 1, 0x08]);
        let p = sentencepiece_pieces(&model).unwrap();
        assert_eq!(
            p,
            vec![Piece {
                piece: "ab".into(),
                score: -1.5,
                kind: 3
            }]
        );
        assert!(sentencepiece_pieces(&[0x0a, 9, 1]).is_none());
    }

    #[test]
    fn special_looking() {
        assert!(looks_special("<|eot_id|>"));
        assert!(looks_special("<pad>"));
        assert!(!looks_special("<s>"));
    }
}
