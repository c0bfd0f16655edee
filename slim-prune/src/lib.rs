//! # slim-prune
//!
//! Structured channel pruning for Slim: whole channels are removed from every layer that
//! shares them (found by `slim-core`'s channel groups), so a pruned model really is smaller
//! and faster.
//!
//! - [`criterion`]: channel importance by L1 norm, L2 norm, geometric median (FPGM) or BN
//!   scale, computed over every layer that produces a group's channels;
//! - [`pruner`]: scopes (glob patterns over layer and parameter names), per-group ratios,
//!   uniform pruning to a ratio or to a FLOPs target, prediction of the pruned cost;
//! - [`sensitivity`]: how much accuracy each group loses at each ratio (resumable file,
//!   groups evaluated in parallel, merge, SVG plot) and per-group ratios chosen from it for a
//!   FLOPs target or a loss budget;
//! - [`auto`]: automatic pruning, a search over per-group ratios (simulated annealing or
//!   evolution, from `slim-core`'s controllers) under a FLOPs limit.
//!
//! [`run`] is the one entrance that `slim prune` and the pipeline share: options in, the
//! ratios chosen by the method asked for, the pruned model and a typed report out;
//! [`strategy`] makes it a step of `slim compress`'s pipeline. Fine-tuning after pruning is
//! `slim-core`'s training loop. This crate depends on `slim-core` alone.
//!
//! ```
//! use candle_core::Device;
//! use slim_core::{analysis::analyze, zoo};
//! use slim_prune::{Criterion, Pruner};
//!
//! let model = zoo::model("mobilenet_tiny", &zoo::ZooConfig::new([1, 28, 28]), 0, &Device::Cpu)?;
//! let pruner = Pruner::new(&model, Criterion::L1Norm, &[])?;
//! let plan = pruner.uniform_for_reduction(0.5)?;
//! assert!((plan.reduction - 0.5).abs() <= 0.01);
//! let pruned = pruner.apply(&plan.ratios)?;
//! assert!(analyze(&pruned.graph).macs < analyze(&model.graph).macs * 51 / 100);
//! # Ok::<(), slim_prune::PruneError>(())
//! ```
#![forbid(unsafe_code)]

pub mod auto;
pub mod criterion;
pub mod pruner;
pub mod run;
pub mod sensitivity;
pub mod strategy;

pub use criterion::Criterion;
pub use pruner::{Pruner, Ratios, UniformPlan};
pub use run::{run, Choice, PruneOptions, PruneReport};

/// The error type of `slim-prune`.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
    /// A request that cannot be honoured: a ratio out of range, a scope that matches nothing,
    /// an unreachable target, a sensitivity file for another model.
    #[error("{0}")]
    Invalid(String),
}

impl PruneError {
    /// Whether the error is about what the user supplied (exit status 2 on the command
    /// line), as [`slim_core::CoreError::is_input`] says for the core's errors.
    pub fn is_input(&self) -> bool {
        match self {
            PruneError::Core(c) => c.is_input(),
            PruneError::Invalid(_) => true,
        }
    }
}

impl From<candle_core::Error> for PruneError {
    fn from(e: candle_core::Error) -> Self {
        PruneError::Core(e.into())
    }
}

/// The result type of `slim-prune`.
pub type Result<T, E = PruneError> = std::result::Result<T, E>;
