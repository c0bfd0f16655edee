//! # slim-onnx
//!
//! Slim's ONNX import and export, so that models trained elsewhere can be compressed and deployed.
//!
//! This crate depends on `slim-core` alone; the `slim` binary wires it to the other method
//! crates. Its algorithms arrive in later releases; today it provides its error type, which
//! wraps the core's.
//!
//! ```
//! use slim_onnx::OnnxError;
//! let e: OnnxError = slim_core::CoreError::UnknownNode("conv9".into()).into();
//! assert!(e.to_string().contains("conv9"));
//! ```

/// The error type of `slim-onnx`.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
}

/// The result type of `slim-onnx`.
pub type Result<T, E = OnnxError> = std::result::Result<T, E>;
