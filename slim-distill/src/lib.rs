//! # slim-distill
//!
//! Slim's knowledge distillation: FSP, L2 and soft-label losses, user losses, teacher/student pairing by node name, several teachers and knowledge precomputed to files.
//!
//! This crate depends on `slim-core` alone; the `slim` binary wires it to the other method
//! crates. Its algorithms arrive in later releases; today it provides its error type, which
//! wraps the core's.
//!
//! ```
//! use slim_distill::DistillError;
//! let e: DistillError = slim_core::CoreError::UnknownNode("conv9".into()).into();
//! assert!(e.to_string().contains("conv9"));
//! ```

/// The error type of `slim-distill`.
#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
}

/// The result type of `slim-distill`.
pub type Result<T, E = DistillError> = std::result::Result<T, E>;
