//! The streaming merge executor.
//!
//! The output's files, headers and every tensor's offset are fixed before any data moves. Work is
//! split into items — byte-range copies of untouched tensors and row blocks of merged ones — that
//! rayon workers process independently: read with positional reads, convert to f32, apply every
//! operation in place, round once to the output dtype, write at the tensor's offset. Each worker
//! owns a few block-sized buffers, and adapter factors are loaded when a tensor's first block
//! starts and dropped when its last block ends, so peak memory is bounded by the number of
//! threads times the block size, not by the model. Files are written to temporary names and
//! renamed into place only when everything succeeded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use adapterkit_core::convert::{decode_to_f32, encode_from_f32};
use adapterkit_core::TensorSource;
use adapterkit_formats::checkpoint::{Checkpoint, Layout as CkptLayout};
use adapterkit_formats::safetensors::{layout, PendingFile, TensorSpec};
use rayon::prelude::*;

use crate::apply::{apply_ops, prepare, Prepared};
use crate::error::{Error, Result};
use crate::kernels::non_finite;
use crate::plan::{OpSpec, Plan};

/// How the output is split into files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharding {
    /// The base's files and tensor assignment.
    #[default]
    Preserve,
    /// New shards of at most this many bytes of tensor data (a tensor larger than the limit gets
    /// a shard of its own).
    MaxBytes(u64),
}

/// Where and how to write the merged checkpoint.
#[derive(Debug, Clone)]
pub struct Output {
    /// A `.safetensors` file, or a directory laid out like the base.
    pub path: PathBuf,
    /// Sharding for directory outputs.
    pub sharding: Sharding,
    /// Allow `path` to be the base itself (files are replaced atomically one by one).
    pub in_place: bool,
    /// Allow replacing an existing output.
    pub overwrite: bool,
}

/// Execution parameters.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Worker threads (0: one per core).
    pub threads: usize,
    /// Write merged tensors that hold NaN or infinity instead of refusing.
    pub allow_nonfinite: bool,
    /// Target number of f32 elements in one row block.
    pub block_elems: usize,
    /// Flush every output file to disk before renaming it into place.
    pub fsync: bool,
    /// Incremented by the output bytes of each finished work item, for progress displays (the
    /// total is [`Plan::out_bytes`]).
    pub progress: Option<Arc<AtomicU64>>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            threads: 0,
            allow_nonfinite: false,
            block_elems: 1 << 17,
            fsync: false,
            progress: None,
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Files written (weights, index, copied extras), final paths.
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors changed by an adapter.
    pub merged: usize,
    /// Tensors whose dtype was converted without other change.
    pub converted: usize,
    /// Tensors copied byte for byte.
    pub copied: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Base files not carried over (weights in other formats).
    pub skipped_files: Vec<String>,
}

enum Item {
    Copy { t: usize, offset: u64, len: u64 },
    Block { t: usize, row0: u64, rows: u64 },
}

struct OutFile {
    name: String,
    tensors: Vec<usize>,
}

#[derive(Default)]
pub(crate) struct Scratch {
    input: Vec<u64>,
    output: Vec<u64>,
    values: Vec<f32>,
    tmp: Vec<f32>,
}

/// The first `len` bytes of a reusable, 8-byte-aligned buffer. The buffer only grows: shrinking
/// and regrowing a `Vec` would zero-fill it again on every item.
pub(crate) fn bytes_of(buf: &mut Vec<u64>, len: usize) -> &mut [u8] {
    let words = len.div_ceil(8);
    if buf.len() < words {
        buf.resize(words, 0);
    }
    &mut bytemuck::cast_slice_mut::<u64, u8>(buf)[..len]
}

/// The first `n` values of a grow-only f32 buffer.
pub(crate) fn values_of(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// One output tensor: its name, stored dtype and shape (a base tensor's name and shape).
#[derive(Debug, Clone)]
pub(crate) struct OutTensor {
    pub name: String,
    pub dtype: adapterkit_core::DType,
    pub shape: Vec<u64>,
}

impl OutTensor {
    fn len(&self) -> u64 {
        self.dtype
            .byte_len(self.shape.iter().product())
            .expect("validated")
    }
}

/// An output checkpoint being written: its files laid out (headers and offsets fixed) under
/// temporary names, filled by [`Staging::write`] from any thread, renamed into place by
/// [`Staging::commit`] only when everything succeeded.
pub(crate) struct Staging<'a> {
    base: &'a Checkpoint,
    output: &'a Output,
    tensors: Vec<OutTensor>,
    files: Vec<OutFile>,
    pending: Vec<PendingFile>,
    place: Vec<(usize, u64)>,
    single_file: bool,
    same_as_base: bool,
    fresh_dir: bool,
    parent: PathBuf,
    write_dir: PathBuf,
    staging: Option<tempfile::TempDir>,
    /// Extra files written with these contents instead of copied from the base.
    overrides: Vec<(String, Vec<u8>)>,
}

impl<'a> Staging<'a> {
    /// Write `bytes` as the extra file `name` (e.g. a config.json with a quantization block)
    /// instead of copying the base's.
    pub(crate) fn replace_file(&mut self, name: &str, bytes: Vec<u8>) {
        self.overrides.retain(|(n, _)| n != name);
        self.overrides.push((name.to_string(), bytes));
    }

    /// Lay out `tensors` (in base order) as `output`, with `base`'s shards, metadata and extra
    /// files as the template.
    pub(crate) fn create(
        base: &'a Checkpoint,
        tensors: Vec<OutTensor>,
        output: &'a Output,
    ) -> Result<Self> {
        let single_file = output.path.extension().is_some_and(|e| e == "safetensors");
        let same_as_base = same_path(&output.path, base.root())
            || base
                .shards()
                .iter()
                .any(|s| same_path(&output.path, s.path()));
        if same_as_base && !output.in_place {
            return Err(Error::Output {
                path: output.path.clone(),
                message: "is the base checkpoint itself; pass --in-place to replace its files (atomically, one by one)".into(),
            });
        }
        let exists = output.path.exists();
        if exists && !same_as_base && !output.overwrite {
            let empty_dir = output.path.is_dir()
                && std::fs::read_dir(&output.path)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !empty_dir {
                return Err(Error::Output {
                    path: output.path.clone(),
                    message: "already exists; remove it or pass --force".into(),
                });
            }
        }

        // Output files and their tensors.
        let files: Vec<OutFile> = if single_file {
            let name = output
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("model.safetensors")
                .to_string();
            vec![OutFile {
                name,
                tensors: (0..tensors.len()).collect(),
            }]
        } else {
            match output.sharding {
                Sharding::Preserve => {
                    let names: Vec<String> = match base.layout() {
                        CkptLayout::File => vec!["model.safetensors".into()],
                        _ => base.shard_names().to_vec(),
                    };
                    let mut files: Vec<OutFile> = names
                        .into_iter()
                        .map(|name| OutFile {
                            name,
                            tensors: vec![],
                        })
                        .collect();
                    for (i, t) in tensors.iter().enumerate() {
                        let s = if files.len() == 1 {
                            0
                        } else {
                            base.shard_of(&t.name).unwrap_or(0)
                        };
                        files[s].tensors.push(i);
                    }
                    files
                }
                Sharding::MaxBytes(max) => {
                    let mut groups: Vec<Vec<usize>> = vec![vec![]];
                    let mut size = 0u64;
                    for (i, t) in tensors.iter().enumerate() {
                        let len = t.len();
                        if size > 0 && size + len > max {
                            groups.push(vec![]);
                            size = 0;
                        }
                        groups.last_mut().expect("non-empty").push(i);
                        size += len;
                    }
                    let n = groups.len();
                    groups
                        .into_iter()
                        .enumerate()
                        .map(|(k, tensors)| OutFile {
                            name: if n == 1 {
                                "model.safetensors".into()
                            } else {
                                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
                            },
                            tensors,
                        })
                        .collect()
                }
            }
        };

        // Staging: a fresh directory is built beside its final place and renamed in whole; an
        // existing one (in place, or --force) gets each file replaced atomically.
        let fresh_dir = !single_file && !exists;
        let parent = output
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        if !parent.is_dir() {
            return Err(Error::Output {
                path: output.path.clone(),
                message: format!("parent directory {} does not exist", parent.display()),
            });
        }
        let staging = if fresh_dir {
            Some(
                tempfile::Builder::new()
                    .prefix(".adapterkit-")
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
                    .tempdir_in(&parent)
                    .map_err(|e| Error::io(&parent, e))?,
            )
        } else {
            None
        };
        let write_dir: PathBuf = match (&staging, single_file) {
            (Some(s), _) => s.path().to_path_buf(),
            (None, true) => parent.clone(),
            (None, false) => output.path.clone(),
        };

        let mut pending = Vec::with_capacity(files.len());
        let mut place: Vec<(usize, u64)> = vec![(0, 0); tensors.len()];
        for (fi, f) in files.iter().enumerate() {
            let specs: Vec<TensorSpec> = f
                .tensors
                .iter()
                .map(|&i| {
                    let t = &tensors[i];
                    TensorSpec {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                    }
                })
                .collect();
            let metadata = base
                .shard_names()
                .iter()
                .position(|n| *n == f.name)
                .and_then(|s| base.shards()[s].metadata())
                .or_else(|| base.metadata());
            let lay = layout(&specs, metadata)?;
            for (&i, info) in f.tensors.iter().zip(&lay.tensors) {
                place[i] = (fi, info.offset);
            }
            let target = if single_file {
                output.path.clone()
            } else {
                write_dir.join(&f.name)
            };
            pending.push(PendingFile::create(&target, lay)?);
        }
        Ok(Staging {
            base,
            output,
            tensors,
            files,
            pending,
            place,
            single_file,
            same_as_base,
            fresh_dir,
            parent,
            write_dir,
            staging,
            overrides: Vec::new(),
        })
    }

    /// Write `bytes` at byte `offset` of output tensor `t`'s data.
    pub(crate) fn write(&self, t: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let (fi, at) = self.place[t];
        Ok(self.pending[fi].write_at(at + offset, bytes)?)
    }

    /// Total bytes of tensor data.
    pub(crate) fn bytes(&self) -> u64 {
        self.tensors.iter().map(OutTensor::len).sum()
    }

    /// Write the index and extra files, rename everything into place; returns the final paths.
    pub(crate) fn commit(self, fsync: bool) -> Result<Vec<PathBuf>> {
        let Staging {
            base,
            output,
            tensors,
            files,
            pending,
            single_file,
            same_as_base,
            fresh_dir,
            parent,
            write_dir,
            staging,
            overrides,
            ..
        } = self;
        let total: u64 = tensors.iter().map(OutTensor::len).sum();
        let final_dir = if single_file {
            parent.clone()
        } else {
            output.path.clone()
        };
        let mut extra_staged: Vec<(tempfile::NamedTempFile, PathBuf)> = Vec::new();
        let index_name = match base.layout() {
            CkptLayout::Sharded { index } => index.clone(),
            _ => "model.safetensors.index.json".to_string(),
        };
        if !single_file && files.len() > 1 {
            let mut weight_map = BTreeMap::new();
            for f in &files {
                for &i in &f.tensors {
                    weight_map.insert(
                        tensors[i].name.clone(),
                        serde_json::Value::String(f.name.clone()),
                    );
                }
            }
            let mut meta = base.index_metadata().cloned().unwrap_or_default();
            meta.insert("total_size".into(), serde_json::Value::from(total));
            let index = serde_json::json!({ "metadata": meta, "weight_map": weight_map });
            let text = serde_json::to_string_pretty(&index).expect("JSON values serialize") + "\n";
            let tmp = stage_bytes(&write_dir, text.as_bytes())?;
            extra_staged.push((tmp, write_dir.join(&index_name)));
        }
        if !(single_file || same_as_base && output.in_place) {
            for (name, bytes) in &overrides {
                let tmp = stage_bytes(&write_dir, bytes)?;
                extra_staged.push((tmp, write_dir.join(name)));
            }
            for name in base.extra_files() {
                if overrides.iter().any(|(n, _)| n == name) {
                    continue;
                }
                let src = base.root().join(name);
                let tmp = tempfile::Builder::new()
                    .prefix(".adapterkit-")
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
                    .tempfile_in(&write_dir)
                    .map_err(|e| Error::io(&write_dir, e))?;
                std::fs::copy(&src, tmp.path()).map_err(|e| Error::io(&src, e))?;
                extra_staged.push((tmp, write_dir.join(name)));
            }
        }
        let mut written: Vec<String> = Vec::new();
        for p in pending {
            written.push(
                p.target()
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string(),
            );
            p.commit(fsync)?;
        }
        for (tmp, target) in extra_staged {
            written.push(
                target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
                    .to_string(),
            );
            if fsync {
                tmp.as_file()
                    .sync_all()
                    .map_err(|e| Error::io(tmp.path(), e))?;
            }
            tmp.persist(&target)
                .map_err(|e| Error::io(&target, e.error))?;
        }
        if !single_file && !fresh_dir {
            // Remove the shards and index of an earlier checkpoint layout that this output no
            // longer has (only files named as a checkpoint's weights are: `model.safetensors`,
            // `model-0000i-of-0000N.safetensors`, their index, and the base's own shards in place).
            let previous: Vec<String> = if same_as_base {
                let mut v = base.shard_names().to_vec();
                if let CkptLayout::Sharded { index } = base.layout() {
                    v.push(index.clone());
                }
                v
            } else {
                Vec::new()
            };
            let checkpoint_name = |n: &str| {
                n == "model.safetensors"
                    || n == "model.safetensors.index.json"
                    || n.strip_prefix("model-")
                        .and_then(|r| r.strip_suffix(".safetensors"))
                        .is_some_and(|r| {
                            let b = r.as_bytes();
                            b.len() == 14
                                && &r[5..9] == "-of-"
                                && b[..5].iter().chain(&b[9..]).all(u8::is_ascii_digit)
                        })
            };
            if let Ok(dir) = std::fs::read_dir(&output.path) {
                for e in dir.flatten() {
                    let n = e.file_name().to_string_lossy().to_string();
                    let weightish = checkpoint_name(&n) || previous.contains(&n);
                    if weightish && !written.contains(&n) && !n.starts_with('.') {
                        std::fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
                    }
                }
            }
        }
        if let Some(staging) = staging {
            let p = staging.keep();
            if let Err(e) = std::fs::rename(&p, &output.path) {
                let _ = std::fs::remove_dir_all(&p);
                return Err(Error::io(&output.path, e));
            }
        }
        Ok(if single_file {
            vec![output.path.clone()]
        } else {
            written.iter().map(|n| final_dir.join(n)).collect()
        })
    }
}

/// Run `work` on every item with `threads` workers (0: one per core), each with its own reused
/// scratch.
pub(crate) fn run_parallel<I: Sync, S: Default + Send>(
    threads: usize,
    items: &[I],
    work: impl Fn(&mut S, &I) -> Result<()> + Sync,
) -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Options(format!("cannot start {threads} threads: {e}")))?;
    // One scratch set per worker thread, reused across items (rayon's per-job init would
    // allocate and zero fresh buffers for every item).
    let scratches: Vec<Mutex<S>> = (0..pool.current_num_threads())
        .map(|_| Mutex::new(S::default()))
        .collect();
    pool.install(|| {
        items.par_iter().with_max_len(1).try_for_each(|item| {
            let slot = rayon::current_thread_index().unwrap_or(0) % scratches.len();
            let mut scratch = scratches[slot].lock().unwrap_or_else(|e| e.into_inner());
            work(&mut scratch, item)
        })
    })
}

/// Execute `plan` against `base`, writing `output`.
pub fn execute(
    base: &Checkpoint,
    plan: &Plan,
    output: &Output,
    opts: &ExecOptions,
) -> Result<MergeReport> {
    let out_tensors = plan
        .tensors
        .iter()
        .map(|t| OutTensor {
            name: t.source.name.clone(),
            dtype: t.out_dtype,
            shape: t.source.shape.clone(),
        })
        .collect();
    let staging = Staging::create(base, out_tensors, output)?;

    // Work items.
    let mut items = Vec::new();
    let mut blocks_of = vec![0usize; plan.tensors.len()];
    const COPY_CHUNK: u64 = 1 << 20;
    for (i, t) in plan.tensors.iter().enumerate() {
        if t.is_copy() {
            let mut off = 0;
            while off < t.source.len {
                let len = COPY_CHUNK.min(t.source.len - off);
                items.push(Item::Copy {
                    t: i,
                    offset: off,
                    len,
                });
                off += len;
            }
            continue;
        }
        let (rows, cols) = t.source.rows_cols();
        let whole = t.ops.iter().any(OpSpec::needs_whole_tensor) || t.source.shape.len() < 2;
        let step = if whole {
            rows.max(1)
        } else {
            (opts.block_elems as u64 / cols.max(1)).max(1)
        };
        let mut r = 0;
        loop {
            let n = step.min(rows - r);
            items.push(Item::Block {
                t: i,
                row0: r,
                rows: n,
            });
            blocks_of[i] += 1;
            r += n;
            if r >= rows {
                break;
            }
        }
    }
    let remaining: Vec<AtomicUsize> = blocks_of.iter().map(|&n| AtomicUsize::new(n)).collect();
    let cache: Vec<Mutex<Option<Arc<Vec<Prepared>>>>> =
        plan.tensors.iter().map(|_| Mutex::new(None)).collect();

    let run = |scratch: &mut Scratch, item: &Item| -> Result<()> {
        match *item {
            Item::Copy { t, offset, len } => {
                let pt = &plan.tensors[t];
                let buf = bytes_of(&mut scratch.input, len as usize);
                base.read_bytes(&pt.source.name, offset, buf)?;
                staging.write(t, offset, buf)?;
                if let Some(p) = &opts.progress {
                    p.fetch_add(len, Ordering::Relaxed);
                }
            }
            Item::Block { t, row0, rows } => {
                let pt = &plan.tensors[t];
                let ops = if pt.ops.is_empty() {
                    None
                } else {
                    let mut slot = cache[t].lock().unwrap_or_else(|e| e.into_inner());
                    if slot.is_none() {
                        *slot = Some(Arc::new(prepare(plan, base, pt)?));
                    }
                    slot.clone()
                };
                let (_, cols) = pt.source.rows_cols();
                let n = (rows * cols) as usize;
                let in_len = pt.source.dtype.byte_len(rows * cols).expect("validated") as usize;
                let in_off = pt.source.dtype.byte_len(row0 * cols).expect("validated");
                let input = bytes_of(&mut scratch.input, in_len);
                base.read_bytes(&pt.source.name, in_off, input)?;
                let values = values_of(&mut scratch.values, n);
                decode_to_f32(pt.source.dtype, input, values)?;
                if let Some(ops) = &ops {
                    apply_ops(values, row0 as usize, cols as usize, ops, &mut scratch.tmp);
                    if !opts.allow_nonfinite {
                        if let Some((count, first)) = non_finite(values) {
                            return Err(Error::NonFinite {
                                tensor: pt.source.name.clone(),
                                count,
                                first: first + (row0 * cols) as usize,
                            });
                        }
                    }
                }
                let out_len = pt.out_dtype.byte_len(rows * cols).expect("validated") as usize;
                let out_off = pt.out_dtype.byte_len(row0 * cols).expect("validated");
                let out = bytes_of(&mut scratch.output, out_len);
                encode_from_f32(pt.out_dtype, values, out)?;
                staging.write(t, out_off, out)?;
                if let Some(p) = &opts.progress {
                    p.fetch_add(out_len as u64, Ordering::Relaxed);
                }
                drop(ops);
                if remaining[t].fetch_sub(1, Ordering::AcqRel) == 1 {
                    cache[t].lock().unwrap_or_else(|e| e.into_inner()).take();
                }
            }
        }
        Ok(())
    };
    run_parallel(opts.threads, &items, run)?;

    // Everything computed: index, extra files, then commit.
    let mut report = MergeReport {
        tensors: plan.tensors.len(),
        skipped_files: base.skipped_files().to_vec(),
        bytes: staging.bytes(),
        ..Default::default()
    };
    for t in &plan.tensors {
        if !t.ops.is_empty() {
            report.merged += 1;
        } else if t.is_copy() {
            report.copied += 1;
        } else {
            report.converted += 1;
        }
    }
    report.files = staging.commit(opts.fsync)?;
    Ok(report)
}

fn stage_bytes(dir: &Path, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut tmp = tempfile::Builder::new()
        .prefix(".adapterkit-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    Ok(tmp)
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
