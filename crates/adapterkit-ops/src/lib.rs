//! adapterkit's math: per-family deltas, the merge planner and the streaming merge executor.
//!
//! A merge is parse → validate → plan → execute: [`plan::plan`] checks every adapter against the
//! base and reports all problems together; [`execute::execute`] streams the base through the
//! plan into the output. [`merge`] does both.

mod apply;
pub mod check;
pub mod combine;
pub mod compress;
pub mod deltas;
pub mod error;
pub mod execute;
pub mod extract;
pub mod families;
pub mod gguf_convert;
pub mod gguf_merge;
pub mod kernels;
pub mod merged_rows;
pub mod methods;
pub mod model_merge;
pub mod plan;
pub mod quantize;
pub mod quantize_st;
pub mod sparse_extract;
pub mod svd;
pub mod torch_rng;

pub use error::{Error, Problem, Result};
pub use execute::{execute, ExecOptions, MergeReport, Output, Sharding};
pub use plan::{plan, plan_direction, Direction, OutDType, Plan, WeightedAdapter};

use adapterkit_formats::Checkpoint;

/// Validate, plan and execute a merge of `adapters` into `base`.
pub fn merge(
    base: &Checkpoint,
    adapters: Vec<WeightedAdapter>,
    out_dtype: OutDType,
    output: &Output,
    opts: &ExecOptions,
) -> Result<MergeReport> {
    let p = plan::plan(base.root(), base, base.tensors(), adapters, out_dtype)?;
    execute::execute(base, &p, output, opts)
}
