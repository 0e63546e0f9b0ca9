//! A Hugging Face checkpoint, with adapters merged in or not, streamed into a GGUF model of a
//! llama.cpp scheme: convert_hf_to_gguf.py (names, q/k permute, metadata, tokenizer) and
//! llama-quantize (type choice, order, quantizers) in one pass, without the intermediate file.

use std::path::Path;

use adapterkit_core::TensorSource;
use adapterkit_formats::gguf::{GgmlType, GgufSpec};
use adapterkit_formats::gguf_lora::permute_rows;
use adapterkit_formats::gguf_quant::{self, Scheme, TensorFacts};
use adapterkit_formats::hf_gguf::{self, Conversion};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::merged_rows::MergedRows;
use crate::plan::Plan;
use crate::quantize::{
    model_facts, quantized_metadata, write_gguf, OutTensor, RowSource, WriteOptions, WriteReport,
};

struct ConvRows<'a> {
    rows: &'a MergedRows<'a>,
    conv: &'a Conversion,
    /// Output index → conversion tensor index.
    map: Vec<usize>,
}

impl RowSource for ConvRows<'_> {
    fn rows(&self, index: usize, row: u64, out: &mut [f32]) -> Result<()> {
        self.rows_unrounded(index, row, out)?;
        // A merged tensor is what the merged checkpoint would hold: rounded to its dtype, so
        // merge-then-convert equals merging to safetensors and converting that, byte for byte.
        let t = &self.conv.tensors[self.map[index]];
        if let Some(hf) = t.hf.as_deref() {
            if self.rows.is_changed(hf) {
                let dt = self.rows.info(hf).expect("planned").dtype;
                for v in out.iter_mut() {
                    *v = adapterkit_formats::compressed::round_to(dt, *v);
                }
            }
        }
        Ok(())
    }

    fn whole(&self, index: usize) -> bool {
        let t = &self.conv.tensors[self.map[index]];
        t.hf.as_deref().is_some_and(|h| self.rows.needs_whole(h))
    }
}

impl ConvRows<'_> {
    fn rows_unrounded(&self, index: usize, row: u64, out: &mut [f32]) -> Result<()> {
        let t = &self.conv.tensors[self.map[index]];
        if let Some(v) = &t.values {
            let n = out.len();
            out.copy_from_slice(&v[row as usize * t.ne[0] as usize..][..n]);
            return Ok(());
        }
        let hf =
            t.hf.as_deref()
                .expect("non-generated tensors name their source");
        let Some(heads) = t.permute_heads else {
            return self.rows.elements(hf, row * t.ne[0], out);
        };
        if t.ne.len() == 1 {
            // A bias: its elements are the rows being permuted.
            let mut all = vec![0f32; t.ne[0] as usize];
            self.rows.elements(hf, 0, &mut all)?;
            let perm = permute_rows(all.len(), heads);
            for (o, &src) in out.iter_mut().zip(&perm[row as usize..]) {
                *o = all[src];
            }
            return Ok(());
        }
        let cols = t.ne[0] as usize;
        let n_rows = t.ne[1] as usize;
        let hd = n_rows / heads.max(1);
        let (r0, r1) = (row as usize, row as usize + out.len() / cols);
        let (h0, h1) = (r0 / hd, r1.div_ceil(hd));
        let mut span = vec![0f32; (h1 - h0) * hd * cols];
        self.rows.elements(hf, (h0 * hd * cols) as u64, &mut span)?;
        let perm = permute_rows(n_rows, heads);
        for (k, g) in (r0..r1).enumerate() {
            let src = perm[g] - h0 * hd;
            out[k * cols..(k + 1) * cols].copy_from_slice(&span[src * cols..(src + 1) * cols]);
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
/// Convert the checkpoint in `dir` (`base`, its `config`), merged by `plan` (which may hold no
/// adapters), to the GGUF file `out` in `scheme`.
pub fn hf_to_gguf(
    dir: &Path,
    config: &Json,
    base: &dyn TensorSource,
    plan: &Plan,
    out: &Path,
    scheme: Scheme,
    pure: bool,
    opts: &WriteOptions,
) -> Result<WriteReport> {
    let rows = MergedRows::new(base, plan);
    let list: Vec<(String, Vec<u64>)> = rows
        .tensors()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let conv = hf_gguf::plan(dir, config, &list)?;
    for t in &conv.tensors {
        if let Some(h) = &t.hf {
            let info = rows.info(h).expect("planned from these tensors");
            if !info.dtype.is_float() {
                return Err(Error::Options(format!(
                    "tensor {h:?} is {}, not floating point; it cannot be converted to GGUF values",
                    info.dtype
                )));
            }
        }
    }
    let quantized = scheme.default_type().is_quantized();
    let base_md = conv.metadata_for(scheme.file_type());
    let facts = model_facts(&base_md);
    let tf: Vec<TensorFacts> = conv
        .tensors
        .iter()
        .map(|t| TensorFacts {
            name: &t.name,
            ne: &t.ne,
            ggml_type: GgmlType::F32,
        })
        .collect();
    let types = gguf_quant::choose_types(scheme, &facts, &tf, pure);
    let (order, metadata) = if quantized {
        let names: Vec<&str> = conv.tensors.iter().map(|t| t.name.as_str()).collect();
        (
            gguf_quant::quantize_order(&names),
            quantized_metadata(&base_md, scheme),
        )
    } else {
        ((0..conv.tensors.len()).collect(), base_md)
    };
    let tensors: Vec<OutTensor> = order
        .iter()
        .map(|&i| OutTensor {
            spec: GgufSpec {
                name: conv.tensors[i].name.clone(),
                ne: conv.tensors[i].ne.clone(),
                ggml_type: types[i],
            },
            copy: false,
        })
        .collect();
    let source = ConvRows {
        rows: &rows,
        conv: &conv,
        map: order,
    };
    write_gguf(out, &metadata, &tensors, &source, opts)
}
