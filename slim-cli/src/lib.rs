//! The `slim` command's code: compress convolutional models by pruning, quantization,
//! distillation and architecture search. It only parses arguments and configurations, calls
//! the library crates and prints their results; no algorithm lives here. The binary
//! (`src/main.rs`) calls [`main`]; the library form lets the fuzz targets reach the pipeline
//! configuration's parser ([`check_config`]).
//!
//! Exit status: 0 on success, 2 on a usage or input error (a bad file, name, shape or value),
//! 1 on any other failure. With `--json` a command prints exactly one JSON object on stdout;
//! progress and logs go to stderr.

/// `print!` and `println!` for results on stdout: a reader that closes it early
/// (`slim info M | head`) ends the program quietly instead of making it panic.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_stdout(&format!($($arg)*)) };
}
macro_rules! outln {
    () => { $crate::output::write_stdout("\n") };
    ($($arg:tt)*) => { $crate::output::write_stdout(&format!("{}\n", format_args!($($arg)*))) };
}

mod common;
mod compress;
mod distill;
mod info;
mod latency;
mod nas;
mod onnx;
mod output;
mod prune;
mod quant;
mod train;

use std::process::ExitCode;

pub use compress::check_config;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "slim",
    version,
    about = "Make convolutional models smaller and faster, and prove it with numbers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a compression pipeline from a TOML file (default: a built-in one on the bundled
    /// data) and print the results table.
    Compress(compress::CompressArgs),
    /// Train a zoo model on a data set and write it as a model file.
    Train(train::TrainArgs),
    /// Top-1 and top-5 accuracy of a model file on a data set's test split.
    Eval(train::EvalArgs),
    /// Per-layer MACs and parameters, totals, and the channel groups of a model.
    Info(info::InfoArgs),
    /// Remove whole channels: uniformly, from sensitivities, or by a search; then fine-tune.
    Prune(prune::PruneArgs),
    /// How much accuracy each channel group loses at each pruning ratio.
    Sensitivity(prune::SensitivityArgs),
    /// Train a student with losses against one or several teachers (or their precomputed
    /// outputs: `slim distill dump`).
    Distill(distill::DistillArgs),
    /// Quantize a model to int8.
    #[command(subcommand)]
    Quant(quant::QuantCommand),
    /// Per-device latency tables: build, estimate, validate.
    #[command(subcommand)]
    Latency(latency::LatencyCommand),
    /// Architecture search under MACs, parameter and latency limits.
    #[command(subcommand)]
    Nas(nas::NasCommand),
    /// Read an ONNX model into a Slim model file (every command also takes .onnx files).
    Import(onnx::ImportArgs),
    /// Write a model file as ONNX (int8 models in QDQ form).
    Export(onnx::ExportArgs),
}

/// An error and the exit status it deserves.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error: anyhow::Error = e.into();
        // Errors about what the user supplied are input errors (status 2); a failure inside a
        // computation is status 1.
        let core_code = |e: &slim_core::CoreError| match e {
            slim_core::CoreError::Candle(_) | slim_core::CoreError::Store(_) => 1,
            _ => 2,
        };
        let code = if let Some(e) = error.downcast_ref::<slim_core::CoreError>() {
            core_code(e)
        } else if let Some(e) = error.downcast_ref::<slim_quant::QuantError>() {
            match e {
                slim_quant::QuantError::Core(c) => core_code(c),
                slim_quant::QuantError::Invalid(_) => 2,
            }
        } else if let Some(e) = error.downcast_ref::<slim_prune::PruneError>() {
            match e {
                slim_prune::PruneError::Core(c) => core_code(c),
                slim_prune::PruneError::Invalid(_) => 2,
            }
        } else if let Some(e) = error.downcast_ref::<slim_distill::DistillError>() {
            match e {
                slim_distill::DistillError::Core(c) => core_code(c),
                slim_distill::DistillError::Invalid(_) => 2,
            }
        } else if let Some(e) = error.downcast_ref::<slim_nas::NasError>() {
            match e {
                slim_nas::NasError::Core(c) => core_code(c),
                slim_nas::NasError::Invalid(_) => 2,
            }
        } else if let Some(e) = error.downcast_ref::<slim_onnx::OnnxError>() {
            match e {
                slim_onnx::OnnxError::Core(c) => core_code(c),
                _ => 2,
            }
        } else if let Some(e) = error.downcast_ref::<slim_dist::DistError>() {
            match e {
                slim_dist::DistError::Core(c) => core_code(c),
                slim_dist::DistError::Invalid(_) => 2,
                slim_dist::DistError::Redis(_) => 1,
            }
        } else if let Some(e) = error.downcast_ref::<slim_latency::LatencyError>() {
            match e {
                slim_latency::LatencyError::Core(c) => core_code(c),
                _ => 2,
            }
        } else {
            1
        };
        Failure { code, error }
    }
}

/// An input error (exit status 2) with a message.
pub fn input_error(msg: impl std::fmt::Display) -> Failure {
    Failure {
        code: 2,
        error: anyhow::anyhow!("{msg}"),
    }
}

/// Parses the command line, runs the command and reports its error, if any.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compress(args) => compress::run(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Info(args) => info::run(args),
        Command::Prune(args) => prune::run_prune(args),
        Command::Sensitivity(args) => prune::run_sensitivity(args),
        Command::Quant(cmd) => quant::run(cmd),
        Command::Distill(args) => distill::run(args),
        Command::Latency(cmd) => latency::run(cmd),
        Command::Nas(cmd) => nas::run(cmd),
        Command::Import(args) => onnx::run_import(args),
        Command::Export(args) => onnx::run_export(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("slim: error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
