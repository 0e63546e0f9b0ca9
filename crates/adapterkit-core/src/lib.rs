//! adapterkit's data model.
//!
//! This crate owns what every other adapterkit crate speaks: element types ([`DType`]), tensor
//! descriptions ([`TensorInfo`]), the [`TensorSource`] seam through which tensor bytes are read, the
//! adapter IR ([`ir`]) and the typed [`Error`]. It never touches files or formats.

pub mod convert;
pub mod dtype;
pub mod error;
pub mod ir;
pub mod tensor;

pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::{TensorInfo, TensorSource};
