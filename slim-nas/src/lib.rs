//! # slim-nas
//!
//! Slim's architecture search: search spaces, simulated-annealing search and one-shot supernet search under FLOPs and latency limits.
//!
//! This crate depends on `slim-core` alone; the `slim` binary wires it to the other method
//! crates. Its algorithms arrive in later releases; today it provides its error type, which
//! wraps the core's.
//!
//! ```
//! use slim_nas::NasError;
//! let e: NasError = slim_core::CoreError::UnknownNode("conv9".into()).into();
//! assert!(e.to_string().contains("conv9"));
//! ```

/// The error type of `slim-nas`.
#[derive(Debug, thiserror::Error)]
pub enum NasError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
}

/// The result type of `slim-nas`.
pub type Result<T, E = NasError> = std::result::Result<T, E>;
