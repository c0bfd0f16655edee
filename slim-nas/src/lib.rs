//! # slim-nas
//!
//! Slim's architecture search: search spaces, and simulated-annealing and one-shot search
//! under MACs, parameter and latency limits.
//!
//! - [`space`]: the [`SearchSpace`] trait (tokens with their choices, the initial tokens,
//!   tokens to graph) and the built-in spaces: MobileNetV2 blocks (expansion, kernel,
//!   channels, repeats per stage), MobileNetV1 widths, ResNet depth and width. Their initial
//!   candidate is the zoo network; [`Spaces`] is the registry a user adds their own to.
//! - [`sa`]: [`sa_search`], which rejects every candidate that breaks a limit before it is
//!   trained, records the rejected and evaluated candidates in a resumable history, and
//!   reports the best. Latency comes through `slim-core`'s [`CostModel`] trait
//!   (`slim-latency`'s table, wired in by the `slim` binary).
//! - [`oneshot`]: a weight-sharing supernet trained once by sampling one candidate per step,
//!   and [`oneshot::OneShotReward`], which scores a candidate with the weights it inherits
//!   (batch-norm statistics recomputed), for the same search.
//!
//! - [`run`]: the one entrance, [`run::run`]: options in ([`run::NasOptions`], the names of
//!   `slim nas`'s flags and of a pipeline stage's keys), the space searched for the data, the
//!   history, plots and results table written, and a typed [`run::NasReport`] out. The
//!   pipeline's `nas.*` stages ([`strategy`]) are it followed by the best candidate's training.
//!
//! This crate depends on `slim-core` alone.
//!
//! ```
//! use slim_core::search::MacsCost;
//! use slim_core::zoo::ZooConfig;
//! use slim_nas::{sa_search, Limits, Reward, SaConfig, Spaces};
//!
//! // A reward that prefers more parameters, to show the limit holding.
//! struct Params;
//! impl Reward for Params {
//!     fn key(&self) -> serde_json::Value { "params".into() }
//!     fn reward(&mut self, _: &[usize], g: &slim_core::Graph) -> slim_core::Result<f64> {
//!         Ok(slim_core::analysis::analyze(g).params as f64 / 1e6)
//!     }
//! }
//! let space = Spaces::builtin().build("resnet", &ZooConfig::new([1, 28, 28])).unwrap();
//! let limits = Limits { max_macs: Some(20_000_000), ..Default::default() };
//! let cfg = SaConfig { iterations: 10, ..Default::default() };
//! let r = sa_search(space.as_ref(), &limits, &mut Params, &cfg, None, &mut |_| {}).unwrap();
//! assert!(r.best.measure.macs <= 20_000_000);
//! assert!(!r.baseline_feasible); // ResNet-20 at 28x28 needs about 33M MACs
//! # let _ = MacsCost;
//! ```
#![forbid(unsafe_code)]

pub mod oneshot;
pub mod run;
pub mod sa;
pub mod space;
pub mod strategy;

pub use sa::{
    candidates, plots, sa_search, sa_worker, Candidate, Evolve, Limits, Measure, NasProgress,
    Reward, SaConfig, SaResult, TrainReward,
};
pub use slim_core::search::CostModel;
pub use space::{SearchSpace, Spaces, Token};

/// The error type of `slim-nas`.
#[derive(Debug, thiserror::Error)]
pub enum NasError {
    /// An error from the core: graph, parameters, files, tensors.
    #[error(transparent)]
    Core(#[from] slim_core::CoreError),
    /// A request that cannot be honoured: a bad space, candidate, limit or setting.
    #[error("{0}")]
    Invalid(String),
}

impl NasError {
    /// Whether the error is about what the user supplied (exit status 2 on the command
    /// line), as [`slim_core::CoreError::is_input`] says for the core's errors.
    pub fn is_input(&self) -> bool {
        match self {
            NasError::Core(c) => c.is_input(),
            NasError::Invalid(_) => true,
        }
    }
}

/// The result type of `slim-nas`.
pub type Result<T, E = NasError> = std::result::Result<T, E>;

impl From<candle_core::Error> for NasError {
    fn from(e: candle_core::Error) -> Self {
        NasError::Core(e.into())
    }
}
