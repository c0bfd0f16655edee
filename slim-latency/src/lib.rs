//! # slim-latency
//!
//! Slim's per-device latency tables: build them by timing ops on this machine, estimate a model's latency from them, and validate estimates against measurements.
//!
//! This crate depends on `slim-core` alone; the `slim` binary wires it to the other method
//! crates. Its algorithms arrive in later releases; today it provides its error type, which
//! wraps the core's.
//!
//! ```
//! use slim_latency::LatencyError;
//! let e: LatencyError = slim_core::CoreError::UnknownNode("conv9".into()).into();
//! assert!(e.to_string().contains("conv9"));
//! ```

/// The error type of `slim-latency`.
#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
}

/// The result type of `slim-latency`.
pub type Result<T, E = LatencyError> = std::result::Result<T, E>;
