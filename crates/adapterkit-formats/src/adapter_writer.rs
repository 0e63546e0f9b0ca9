//! Writing a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
//! atomically, with tensors streamed through a spool file so memory does not grow with the
//! adapter.
//!
//! Tensors are appended as they are produced; [`AdapterWriter::finish`] lays the safetensors file
//! out (names sorted, as PEFT's `save_pretrained` writes them), copies the spooled bytes to their
//! offsets and renames the finished directory into place. Dropping an unfinished writer leaves
//! nothing behind.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use adapterkit_core::DType;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::safetensors::{layout, PendingFile, TensorSpec};

/// Builds one adapter directory.
#[derive(Debug)]
pub struct AdapterWriter {
    target: PathBuf,
    overwrite: bool,
    staging: tempfile::TempDir,
    spool: File,
    spool_path: PathBuf,
    entries: Vec<(TensorSpec, u64, u64)>,
    spooled: u64,
}

impl AdapterWriter {
    /// Start writing the adapter directory `target`. An existing non-empty `target` is an error
    /// unless `overwrite`; the check is made now, before any work.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self> {
        if target.exists() {
            let empty_dir = target.is_dir()
                && std::fs::read_dir(target)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !target.is_dir() {
                return Err(Error::io(
                    target,
                    std::io::Error::other("exists and is not a directory"),
                ));
            }
            if !empty_dir && !overwrite {
                return Err(Error::io(
                    target,
                    std::io::Error::other("already exists; remove it or pass --force"),
                ));
            }
        }
        let parent = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(".adapterkit-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .tempdir_in(parent)
            .map_err(|e| Error::io(parent, e))?;
        let spool_path = staging.path().join(".spool");
        let spool = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&spool_path)
            .map_err(|e| Error::io(&spool_path, e))?;
        Ok(AdapterWriter {
            target: target.to_path_buf(),
            overwrite,
            staging,
            spool,
            spool_path,
            entries: Vec::new(),
            spooled: 0,
        })
    }

    /// Append a tensor. `bytes` must be `dtype`'s little-endian encoding of `shape`.
    pub fn add(&mut self, name: &str, dtype: DType, shape: Vec<u64>, bytes: &[u8]) -> Result<()> {
        self.add_from(name, dtype, shape, bytes.len() as u64, &mut |off, buf| {
            buf.copy_from_slice(&bytes[off as usize..off as usize + buf.len()]);
            Ok(())
        })
    }

    /// Append a tensor of `len` bytes produced piecewise: `fill(offset, buf)` must fill `buf`
    /// with the bytes at `offset`. Large tensors are copied through a fixed buffer.
    pub fn add_from(
        &mut self,
        name: &str,
        dtype: DType,
        shape: Vec<u64>,
        len: u64,
        fill: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
        if numel.and_then(|n| dtype.byte_len(n)) != Some(len) {
            return Err(Error::InvalidTensor {
                path: self.target.clone(),
                tensor: name.to_string(),
                message: format!(
                    "{len} bytes given for {dtype} {shape:?} ({:?} expected)",
                    numel.and_then(|n| dtype.byte_len(n))
                ),
            });
        }
        if self.entries.iter().any(|(s, _, _)| s.name == name) {
            return Err(Error::DuplicateTensor {
                path: self.target.clone(),
                tensor: name.to_string(),
            });
        }
        let mut buf = vec![0u8; (len as usize).min(4 << 20)];
        let mut off = 0u64;
        while off < len {
            let n = ((len - off) as usize).min(buf.len());
            fill(off, &mut buf[..n])?;
            self.spool
                .write_all(&buf[..n])
                .map_err(|e| Error::io(&self.spool_path, e))?;
            off += n as u64;
        }
        self.entries.push((
            TensorSpec {
                name: name.to_string(),
                dtype,
                shape,
            },
            self.spooled,
            len,
        ));
        self.spooled += len;
        Ok(())
    }

    /// Append f32 values, stored as `dtype` (f32, bf16 or f16).
    pub fn add_f32(&mut self, name: &str, dtype: DType, shape: Vec<u64>, v: &[f32]) -> Result<()> {
        let n = dtype
            .byte_len(v.len() as u64)
            .ok_or_else(|| Error::InvalidTensor {
                path: self.target.clone(),
                tensor: name.to_string(),
                message: format!("{dtype} has no byte size"),
            })?;
        let mut bytes = vec![0u8; n as usize];
        adapterkit_core::convert::encode_from_f32(dtype, v, &mut bytes)?;
        self.add(name, dtype, shape, &bytes)
    }

    /// Number of tensors added.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no tensor was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors` and move them into place.
    /// Returns the final paths.
    pub fn finish(mut self, config: &Value) -> Result<Vec<PathBuf>> {
        self.entries.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let specs: Vec<TensorSpec> = self.entries.iter().map(|e| e.0.clone()).collect();
        let meta = vec![("format".to_string(), "pt".to_string())];
        let lay = layout(&specs, Some(&meta))?;
        let st_staged = self.staging.path().join("adapter_model.safetensors");
        let pending = PendingFile::create(&st_staged, lay)?;
        let offsets: Vec<u64> = pending.layout().tensors.iter().map(|t| t.offset).collect();
        let mut buf = vec![0u8; 1 << 20];
        for ((_, start, len), off) in self.entries.iter().zip(offsets) {
            self.spool
                .seek(SeekFrom::Start(*start))
                .map_err(|e| Error::io(&self.spool_path, e))?;
            let mut done = 0u64;
            while done < *len {
                let n = ((*len - done) as usize).min(buf.len());
                self.spool
                    .read_exact(&mut buf[..n])
                    .map_err(|e| Error::io(&self.spool_path, e))?;
                pending.write_at(off + done, &buf[..n])?;
                done += n as u64;
            }
        }
        pending.commit(false)?;
        drop(self.spool);
        std::fs::remove_file(&self.spool_path).map_err(|e| Error::io(&self.spool_path, e))?;
        let cfg_staged = self.staging.path().join("adapter_config.json");
        let mut text = serde_json::to_string_pretty(config).map_err(|e| {
            Error::io(
                &cfg_staged,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        text.push('\n');
        std::fs::write(&cfg_staged, text).map_err(|e| Error::io(&cfg_staged, e))?;
        let names = ["adapter_config.json", "adapter_model.safetensors"];
        let finals: Vec<PathBuf> = names.iter().map(|n| self.target.join(n)).collect();
        if !self.target.exists() {
            // The whole directory appears at once.
            let staged = self.staging.keep();
            std::fs::rename(&staged, &self.target).map_err(|e| Error::io(&self.target, e))?;
        } else {
            debug_assert!(self.overwrite || is_empty_dir(&self.target));
            // Each file is replaced atomically; the weights go first so a config never
            // describes tensors that are not there.
            for n in names.iter().rev() {
                let from = self.staging.path().join(n);
                let to = self.target.join(n);
                std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
            }
        }
        Ok(finals)
    }
}

fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::SafetensorsFile;
    use adapterkit_core::TensorSource;

    #[test]
    fn writes_sorted_tensors_and_config_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        let mut w = AdapterWriter::create(&out, false).unwrap();
        w.add_f32("b", DType::F32, vec![2], &[1.0, 2.0]).unwrap();
        w.add_f32("a", DType::BF16, vec![1, 2], &[3.0, 4.0])
            .unwrap();
        assert!(w.add_f32("a", DType::F32, vec![1], &[0.0]).is_err());
        assert!(w.add("c", DType::F32, vec![3], &[0; 8]).is_err());
        assert!(!out.exists());
        let files = w.finish(&serde_json::json!({"peft_type": "LORA"})).unwrap();
        assert_eq!(files.len(), 2);
        let f = SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap();
        let names: Vec<_> = f.tensors().iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(f.read_f32("a").unwrap(), vec![3.0, 4.0]);
        assert_eq!(f.read_f32("b").unwrap(), vec![1.0, 2.0]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        // An existing output needs overwrite.
        assert!(AdapterWriter::create(&out, false).is_err());
        let w = AdapterWriter::create(&out, true).unwrap();
        w.finish(&serde_json::json!({})).unwrap();
        let f = SafetensorsFile::open(out.join("adapter_model.safetensors")).unwrap();
        assert!(f.tensors().is_empty());
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        let mut w = AdapterWriter::create(&out, false).unwrap();
        w.add_f32("a", DType::F32, vec![1], &[1.0]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
