//! Base checkpoints: a Hugging Face model directory (one `model.safetensors`, or shards plus
//! `model.safetensors.index.json`) or a bare `.safetensors` file, opened as one [`TensorSource`].
//! Spec: `formats/checkpoint.md`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use adapterkit_core::{TensorInfo, TensorSource};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::safetensors::SafetensorsFile;

/// The largest index or config JSON read (bytes).
pub const MAX_JSON_LEN: u64 = 64 << 20;

/// File extensions of weight formats other than safetensors. They are never copied into a merged
/// output (they would hold the unmerged weights) and pickled ones are never opened.
pub const OTHER_WEIGHT_EXTENSIONS: &[&str] =
    &["bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "pkl"];

/// How the checkpoint is laid out on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A bare `.safetensors` file.
    File,
    /// A directory with one safetensors file.
    Directory,
    /// A directory with shards and an index (the index file's name).
    Sharded {
        /// The index file name (`model.safetensors.index.json`).
        index: String,
    },
}

/// An opened, validated base checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    layout: Layout,
    shards: Vec<SafetensorsFile>,
    shard_names: Vec<String>,
    by_name: HashMap<String, (usize, usize)>,
    index_metadata: Option<serde_json::Map<String, Value>>,
    config: Option<Value>,
    extra_files: Vec<String>,
    skipped_files: Vec<String>,
}

/// Read a JSON file with a size cap.
pub fn read_json(path: &Path) -> Result<Value> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_JSON_LEN {
        return Err(Error::InvalidConfig {
            path: path.to_path_buf(),
            message: format!("{len} bytes exceeds the {MAX_JSON_LEN}-byte cap for JSON files"),
        });
    }
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn is_other_weight(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| OTHER_WEIGHT_EXTENSIONS.contains(&e))
}

impl Checkpoint {
    /// Open a base checkpoint: a `.safetensors` file or a model directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if is_other_weight(name) {
                return Err(Error::PickleRefused {
                    path: path.to_path_buf(),
                });
            }
            let root = path.parent().unwrap_or(Path::new("")).to_path_buf();
            let shard = SafetensorsFile::open(path)?;
            return Self::assemble(
                root,
                Layout::File,
                vec![(name.to_string(), shard)],
                None,
                None,
                vec![],
                vec![],
            );
        }
        let mut files = BTreeSet::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            // Follow symlinks: the Hugging Face cache's snapshot directories are made of them.
            if std::fs::metadata(entry.path())
                .map_err(|e| Error::io(entry.path(), e))?
                .is_file()
            {
                if let Some(n) = entry.file_name().to_str() {
                    files.insert(n.to_string());
                }
            }
        }
        let indexes: Vec<&String> = files
            .iter()
            .filter(|f| f.ends_with(".safetensors.index.json"))
            .collect();
        let index_name = if files.contains("model.safetensors.index.json") {
            Some("model.safetensors.index.json".to_string())
        } else if indexes.len() == 1 {
            Some(indexes[0].clone())
        } else if indexes.len() > 1 {
            return Err(Error::NotFound {
                path: path.to_path_buf(),
                message: format!(
                    "several safetensors indexes ({}); pass one file",
                    indexes
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        } else {
            None
        };
        let config = if files.contains("config.json") {
            Some(read_json(&path.join("config.json"))?)
        } else {
            None
        };
        let (layout, shard_names, index_metadata, weight_map) = match index_name {
            Some(idx) => {
                let ipath = path.join(&idx);
                let v = read_json(&ipath)?;
                let bad = |m: String| Error::InvalidIndex {
                    path: ipath.clone(),
                    message: m,
                };
                let map = v
                    .get("weight_map")
                    .and_then(Value::as_object)
                    .ok_or_else(|| bad("missing \"weight_map\" object".into()))?;
                let mut weight_map = HashMap::with_capacity(map.len());
                let mut names = BTreeSet::new();
                for (tensor, file) in map {
                    let file = file
                        .as_str()
                        .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
                    if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty()
                    {
                        return Err(bad(format!("weight_map[{tensor:?}] = {file:?} is not a plain file name in the checkpoint directory")));
                    }
                    if !files.contains(file) {
                        return Err(bad(format!(
                            "shard {file:?} (holding {tensor:?}) does not exist"
                        )));
                    }
                    names.insert(file.to_string());
                    weight_map.insert(tensor.clone(), file.to_string());
                }
                let meta = v.get("metadata").and_then(Value::as_object).cloned();
                (
                    Layout::Sharded { index: idx },
                    names.into_iter().collect::<Vec<_>>(),
                    meta,
                    Some(weight_map),
                )
            }
            None => {
                let st: Vec<&String> = files
                    .iter()
                    .filter(|f| f.ends_with(".safetensors"))
                    .collect();
                let name = if files.contains("model.safetensors") {
                    "model.safetensors".to_string()
                } else if st.len() == 1 {
                    st[0].clone()
                } else if st.is_empty() {
                    if let Some(p) = files.iter().find(|f| is_other_weight(f)) {
                        return Err(Error::PickleRefused { path: path.join(p) });
                    }
                    return Err(Error::NotFound {
                        path: path.to_path_buf(),
                        message: "no model.safetensors (or sharded index) in this directory".into(),
                    });
                } else {
                    return Err(Error::NotFound {
                        path: path.to_path_buf(),
                        message: format!(
                            "several safetensors files and no index ({}); pass one file",
                            st.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    });
                };
                (Layout::Directory, vec![name], None, None)
            }
        };
        let mut shards = Vec::with_capacity(shard_names.len());
        for n in &shard_names {
            shards.push((n.clone(), SafetensorsFile::open(path.join(n))?));
        }
        if let (Some(wm), Layout::Sharded { index }) = (&weight_map, &layout) {
            let ipath = path.join(index);
            for (n, shard) in &shards {
                for t in shard.tensors() {
                    match wm.get(&t.name) {
                        Some(f) if f == n => {}
                        Some(f) => {
                            return Err(Error::InvalidIndex {
                                path: ipath,
                                message: format!(
                                    "tensor {:?} is in shard {n:?} but the index maps it to {f:?}",
                                    t.name
                                ),
                            })
                        }
                        None => {
                            return Err(Error::InvalidIndex {
                                path: ipath,
                                message: format!(
                                    "tensor {:?} in shard {n:?} is missing from the index",
                                    t.name
                                ),
                            })
                        }
                    }
                }
            }
            let total: usize = shards.iter().map(|(_, s)| s.tensors().len()).sum();
            if total != wm.len() {
                let missing = wm.iter().find(|(t, f)| {
                    shards
                        .iter()
                        .find(|(n, _)| n == *f)
                        .is_some_and(|(_, s)| s.info(t).is_none())
                });
                return Err(Error::InvalidIndex {
                    path: ipath,
                    message: match missing {
                        Some((t, f)) => {
                            format!("the index maps {t:?} to {f:?} but that shard does not hold it")
                        }
                        None => "index and shards disagree".into(),
                    },
                });
            }
        }
        let mut extra = Vec::new();
        let mut skipped = Vec::new();
        for f in &files {
            if shard_names.contains(f) || matches!(&layout, Layout::Sharded { index } if index == f)
            {
                continue;
            }
            if is_other_weight(f)
                || f.ends_with(".safetensors")
                || f.ends_with(".safetensors.index.json")
            {
                skipped.push(f.clone());
            } else {
                extra.push(f.clone());
            }
        }
        Self::assemble(
            path.to_path_buf(),
            layout,
            shards,
            index_metadata,
            config,
            extra,
            skipped,
        )
    }

    fn assemble(
        root: PathBuf,
        layout: Layout,
        shards: Vec<(String, SafetensorsFile)>,
        index_metadata: Option<serde_json::Map<String, Value>>,
        config: Option<Value>,
        extra_files: Vec<String>,
        skipped_files: Vec<String>,
    ) -> Result<Self> {
        let mut by_name = HashMap::new();
        for (si, (n, s)) in shards.iter().enumerate() {
            for (ti, t) in s.tensors().iter().enumerate() {
                if by_name.insert(t.name.clone(), (si, ti)).is_some() {
                    return Err(Error::DuplicateTensor {
                        path: root.join(n),
                        tensor: t.name.clone(),
                    });
                }
            }
        }
        let (shard_names, shards) = shards.into_iter().unzip();
        Ok(Checkpoint {
            root,
            layout,
            shards,
            shard_names,
            by_name,
            index_metadata,
            config,
            extra_files,
            skipped_files,
        })
    }

    /// The directory the checkpoint lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How it is laid out.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The shard files, in name order.
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    /// The shard file names, parallel to [`Checkpoint::shards`].
    pub fn shard_names(&self) -> &[String] {
        &self.shard_names
    }

    /// Every tensor, shard by shard, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.shards.iter().flat_map(|s| s.tensors().iter())
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether it holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The shard index holding `name`.
    pub fn shard_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).map(|&(s, _)| s)
    }

    /// The index's `metadata` object, when sharded.
    pub fn index_metadata(&self) -> Option<&serde_json::Map<String, Value>> {
        self.index_metadata.as_ref()
    }

    /// `config.json`, when present.
    pub fn config(&self) -> Option<&Value> {
        self.config.as_ref()
    }

    /// The architecture named in `config.json` (`architectures[0]`, else `model_type`).
    pub fn architecture(&self) -> Option<String> {
        let c = self.config.as_ref()?;
        c.get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| c.get("model_type").and_then(Value::as_str))
            .map(str::to_string)
    }

    /// Non-weight files of the directory (config, tokenizer, …), to be copied beside a merged
    /// output.
    pub fn extra_files(&self) -> &[String] {
        &self.extra_files
    }

    /// Weight files of other formats (and stray safetensors files) that a merged output does not
    /// carry over.
    pub fn skipped_files(&self) -> &[String] {
        &self.skipped_files
    }

    /// `__metadata__` of the first shard.
    pub fn metadata(&self) -> Option<&[(String, String)]> {
        self.shards.first().and_then(|s| s.metadata())
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors().map(|t| t.len).sum()
    }
}

impl TensorSource for Checkpoint {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        let &(s, t) = self.by_name.get(name)?;
        Some(&self.shards[s].tensors()[t])
    }

    fn read_bytes(&self, name: &str, offset: u64, buf: &mut [u8]) -> adapterkit_core::Result<()> {
        let &(s, _) = self
            .by_name
            .get(name)
            .ok_or_else(|| adapterkit_core::Error::TensorNotFound { name: name.into() })?;
        self.shards[s].read_bytes(name, offset, buf)
    }
}
