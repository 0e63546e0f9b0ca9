//! adapterkit's file formats.
//!
//! - [`safetensors`]: header parsing with full validation and caps, positional and memory-mapped
//!   reading, and a writer that lays out the whole file up front so workers can write tensors at
//!   their offsets in parallel, into a temporary file renamed into place (spec:
//!   `formats/safetensors.md`).
//! - [`checkpoint`]: Hugging Face model directories (single or sharded) and bare safetensors files.
//! - [`peft`]: PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`) into
//!   the adapter IR (spec: `formats/peft.md`).
//!
//! - [`adapter_writer`]: PEFT adapter directories written atomically, tensors streamed through a
//!   spool file.
//!
//! This crate does layout only; arithmetic lives in `adapterkit-ops`.

pub mod adapter_writer;
pub mod adapterhub;
pub mod base_names;
pub mod bnb;
pub mod checkpoint;
pub mod compressed;
pub mod convert;
pub mod diffusers;
pub mod error;
pub mod flux;
pub mod gguf;
pub mod gguf_lora;
pub mod gguf_quant;
pub mod gguf_vocab;
pub mod hf_gguf;
mod iquants;
pub mod kohya;
pub mod kquants;
pub mod memory;
pub mod mlx;
pub mod peft;
pub mod peft_families;
pub mod quants;
pub mod recipe;
pub mod safetensors;
pub mod sgm;
pub mod sparse;

pub use adapter_writer::AdapterWriter;
pub use checkpoint::Checkpoint;
pub use error::{Error, Result};
