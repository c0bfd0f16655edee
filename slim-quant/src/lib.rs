//! # slim-quant
//!
//! Slim's quantization: fake quantization with a straight-through gradient, post-training calibration, quantization-aware training, int8 model files and an int8 runtime.
//!
//! This crate depends on `slim-core` alone; the `slim` binary wires it to the other method
//! crates. Its algorithms arrive in later releases; today it provides its error type, which
//! wraps the core's.
//!
//! ```
//! use slim_quant::QuantError;
//! let e: QuantError = slim_core::CoreError::UnknownNode("conv9".into()).into();
//! assert!(e.to_string().contains("conv9"));
//! ```

/// The error type of `slim-quant`.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
}

/// The result type of `slim-quant`.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;
