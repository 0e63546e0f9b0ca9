//! Rows of a base model with adapters merged in, on demand: the merge executor's plan and
//! per-row operations, read by consumers that write something other than safetensors (GGUF
//! conversion and quantization, quantized safetensors).

use std::collections::HashMap;
use std::sync::OnceLock;

use adapterkit_core::convert::decode_to_f32;
use adapterkit_core::{TensorInfo, TensorSource};

use crate::apply::{apply_ops, prepare, Prepared};
use crate::error::{Error, Result};
use crate::plan::{OpSpec, Plan};

/// A planned merge, readable row block by row block.
pub struct MergedRows<'a> {
    base: &'a dyn TensorSource,
    plan: &'a Plan,
    by_name: HashMap<&'a str, usize>,
    prepared: Vec<OnceLock<std::result::Result<Vec<Prepared>, String>>>,
}

impl std::fmt::Debug for MergedRows<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergedRows")
            .field("tensors", &self.plan.tensors.len())
            .finish_non_exhaustive()
    }
}

impl<'a> MergedRows<'a> {
    /// Read `plan` (made over `base`).
    pub fn new(base: &'a dyn TensorSource, plan: &'a Plan) -> Self {
        let by_name = plan
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.source.name.as_str(), i))
            .collect();
        MergedRows {
            base,
            plan,
            by_name,
            prepared: (0..plan.tensors.len()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The base tensors, in base order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.plan.tensors.iter().map(|t| &t.source)
    }

    /// The tensor called `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.plan.tensors[i].source)
    }

    /// Whether an adapter changes `name`.
    pub fn is_changed(&self, name: &str) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|&i| !self.plan.tensors[i].ops.is_empty())
    }

    /// Whether `name` can only be computed whole: its update needs column norms, or it has more
    /// than two dimensions (the update's rows are not the file's rows).
    pub fn needs_whole(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|&i| {
            let t = &self.plan.tensors[i];
            !t.ops.is_empty()
                && (t.source.shape.len() > 2 || t.ops.iter().any(OpSpec::needs_whole_tensor))
        })
    }

    /// Elements `[start, start + out.len())` of `name` in row-major order, merged, as f32. When an
    /// adapter changes the tensor, the range must be whole rows (of the first dimension).
    pub fn elements(&self, name: &str, start: u64, out: &mut [f32]) -> Result<()> {
        let &i = self
            .by_name
            .get(name)
            .ok_or_else(|| Error::Options(format!("tensor {name:?} is not in the base")))?;
        let t = &self.plan.tensors[i];
        let (_, cols) = t.source.rows_cols();
        let dt = t.source.dtype;
        let mut raw = vec![0u8; dt.byte_len(out.len() as u64).unwrap_or(0) as usize];
        self.base
            .read_bytes(name, dt.byte_len(start).unwrap_or(0), &mut raw)?;
        decode_to_f32(dt, &raw, out)?;
        if t.ops.is_empty() {
            return Ok(());
        }
        if start % cols.max(1) != 0 || out.len() as u64 % cols.max(1) != 0 {
            return Err(Error::Options(format!(
                "tensor {name:?}: elements {start}..{} are not whole rows of {cols}",
                start + out.len() as u64
            )));
        }
        let row = start / cols.max(1);
        let ops = self.prepared[i]
            .get_or_init(|| prepare(self.plan, self.base, t).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Options(format!("tensor {name:?}: {e}")))?;
        let mut tmp = Vec::new();
        apply_ops(out, row as usize, cols as usize, ops, &mut tmp);
        Ok(())
    }
}
