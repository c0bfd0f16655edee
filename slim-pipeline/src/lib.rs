//! # slim-pipeline
//!
//! Slim's compression pipelines, PaddleSlim's Compressor: a TOML file names the model (a zoo
//! network to train, or a model file), the data, the training recipe and an ordered list of
//! stages (pruning, quantization, distillation, architecture search), and the pipeline does
//! the rest. It is what `slim compress` runs, as a library.
//!
//! - [`config`]: the typed configuration; [`Pipeline::parse`] checks it whole before any work
//!   (every stage's table is read into its method's own options, the model file and latency
//!   tables it names are read), with errors that name the key and its line.
//! - [`run`]: [`Pipeline::run`] trains or reads the baseline, runs each stage from the model
//!   it starts from (`from`: the stage before, a named earlier stage, the baseline, or fresh
//!   weights), saves and measures every model (accuracy, or without labels the fidelity to
//!   the baseline; int8 models on the int8 runtime), and keeps the state in the output folder,
//!   so that a stopped run resumes where it stopped.
//! - [`report`]: every model timed in one sitting, the results table (text and report.md),
//!   report.json and an accuracy-against-size plot.
//!
//! ```no_run
//! use slim_pipeline::{Events, Pipeline, RunOptions, DEFAULT_CONFIG};
//! let mut pipeline = Pipeline::parse(DEFAULT_CONFIG, "the default pipeline")?;
//! let events = Events { note: &|s| eprintln!("{s}"), progress: &mut |_| {}, status: &|_| {} };
//! let report = pipeline.run(&RunOptions::default(), events)?;
//! print!("{}", report.table);
//! # Ok::<(), slim_pipeline::PipelineError>(())
//! ```
#![forbid(unsafe_code)]

pub mod config;
pub mod report;
pub mod run;

pub use config::{Config, Pipeline, Source, Stage};
pub use report::Row;
pub use run::{Events, Report, RunOptions};

/// The pipeline `slim compress` runs when no configuration is given.
pub const DEFAULT_CONFIG: &str = r#"# The default pipeline: a MobileNet trained on the bundled MNIST digits, pruned to half
# its multiply-adds and fine-tuned, then quantized to int8.
[model]
zoo = "mobilenet_tiny"

[data]
spec = "builtin:mnist-10k"

[train]
epochs = 3
lr = 0.003
batch_size = 64
optimizer = "adam"

[[strategy]]
kind = "prune.uniform"
flops_reduction = 0.5
finetune_epochs = 1

[[strategy]]
kind = "quant.ptq"
weights = "channel_wise_abs_max"
# Each activation range chosen for the least squared error of its int8 rounding.
activations = "mse"

[output]
dir = "slim-out"
"#;

/// The pipeline for a model file (`slim compress --model`): prune 30% of its multiply-adds
/// with a fine-tuning epoch (on the labels, or reproducing the original), then int8; `file`,
/// `spec` and `dir` are the model file, the data spec and the output folder.
pub fn model_config(file: &std::path::Path, spec: &str, dir: &std::path::Path) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    format!(
        r#"# The default pipeline for a model file (slim compress --model): prune 30% of its
# multiply-adds uniformly with one fine-tuning epoch (without labels, the pruned model
# learns to reproduce the original), then quantize to int8. Edit it and run it with
# `slim compress --config pipeline.toml`.
[model]
file = {}

[data]
spec = {}

[train]
epochs = 1
lr = 0.001
batch_size = 64
optimizer = "adam"

[[strategy]]
kind = "prune.uniform"
flops_reduction = 0.3
finetune_epochs = 1

[[strategy]]
kind = "quant.ptq"
weights = "channel_wise_abs_max"
activations = "mse"

[output]
dir = {}
"#,
        quote(&file.display().to_string()),
        quote(spec),
        quote(&dir.display().to_string())
    )
}

/// The error of a pipeline: its message, and whether it is about what the user supplied
/// (a configuration, a file, a value: exit status 2 on the command line) or a failure inside
/// a computation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct PipelineError {
    message: String,
    input: bool,
}

impl PipelineError {
    /// An error with `message`, about the user's input or not (a caller's reader failing).
    pub fn new(message: impl Into<String>, input: bool) -> Self {
        PipelineError {
            message: message.into(),
            input,
        }
    }

    /// Whether the error is about what the user supplied.
    pub fn is_input(&self) -> bool {
        self.input
    }
}

/// An error about the user's input.
pub(crate) fn invalid(message: impl std::fmt::Display) -> PipelineError {
    PipelineError {
        message: message.to_string(),
        input: true,
    }
}

/// The method crates' errors say themselves whether they are the user's input.
macro_rules! blamed {
    ($($t:ty),*) => {$(
        impl From<$t> for PipelineError {
            fn from(e: $t) -> Self {
                PipelineError { input: e.is_input(), message: e.to_string() }
            }
        }
    )*};
}
blamed!(
    slim_core::CoreError,
    slim_quant::QuantError,
    slim_latency::LatencyError,
    slim_onnx::OnnxError
);

/// The system's and a serializer's errors are failures.
macro_rules! failed {
    ($($t:ty),*) => {$(
        impl From<$t> for PipelineError {
            fn from(e: $t) -> Self {
                PipelineError { input: false, message: e.to_string() }
            }
        }
    )*};
}
failed!(std::io::Error, serde_json::Error);

/// The result type of `slim-pipeline`.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// Checks a configuration as `slim compress --check` does and returns the kinds of its
/// stages in order; `origin` names it in messages.
pub fn check_config(text: &str, origin: &str) -> Result<Vec<String>> {
    Ok(Pipeline::parse(text, origin)?.kinds())
}
