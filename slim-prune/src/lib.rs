//! # slim-prune
//!
//! Slim's structured channel pruning: importance criteria (L1, L2, geometric median, BN scale), uniform pruning to a ratio or a FLOPs target, sensitivity analysis, and automatic pruning by simulated annealing.
//!
//! This crate depends on `slim-core` alone; the `slim` binary wires it to the other method
//! crates. Its algorithms arrive in later releases; today it provides its error type, which
//! wraps the core's.
//!
//! ```
//! use slim_prune::PruneError;
//! let e: PruneError = slim_core::CoreError::UnknownNode("conv9".into()).into();
//! assert!(e.to_string().contains("conv9"));
//! ```

/// The error type of `slim-prune`.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
}

/// The result type of `slim-prune`.
pub type Result<T, E = PruneError> = std::result::Result<T, E>;
