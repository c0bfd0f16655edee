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

mod bench;
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
mod run;
mod train;

use std::process::ExitCode;

pub use compress::check_config;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "slim",
    version,
    about = "Make convolutional models smaller and faster, and prove it with numbers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Image folders without a split of their own: the share of each class (of all images,
    /// without labels) held out for testing, in (0, 1).
    #[arg(long, global = true, default_value_t = 0.1, value_name = "F")]
    val_fraction: f64,
    /// Image folders: leave out files that are not images or do not decode, reporting how
    /// many and which, instead of refusing the folder.
    #[arg(long, global = true)]
    skip_bad_images: bool,
    /// Training augmentation in place of the data set's own: none, or a list of flip,
    /// pad-crop:PIXELS and resized-crop[:MIN_SHARE] (a window of at least that share of the
    /// area, default 0.08, resized back). Image folders default to resized-crop,flip; CIFAR-10
    /// to pad-crop:4,flip; MNIST-like sets to none.
    #[arg(long, global = true, value_name = "LIST")]
    augment: Option<String>,
    /// Image folders: the decoded cache in MiB. A folder whose decoded images fit is decoded
    /// once into memory; a larger one is decoded batch by batch from its files, in parallel
    /// with training (0: always from the files).
    #[arg(long, global = true, value_name = "MB", default_value_t = slim_core::data::DEFAULT_CACHE_MB)]
    cache_mb: usize,
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
    /// Run a model file on NumPy arrays (.npy) and write each of its outputs as a .npy file.
    Run(run::RunArgs),
    /// Per-layer MACs and parameters, totals, and the channel groups of a model.
    Info(info::InfoArgs),
    /// Time a model file's forward on Slim's runtime: milliseconds per batch, images per second.
    Bench(bench::BenchArgs),
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

/// The library crates' errors say themselves whether they are the user's input (status 2) or
/// a failure inside a computation (status 1).
macro_rules! blamed {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                Failure {
                    code: if e.is_input() { 2 } else { 1 },
                    error: e.into(),
                }
            }
        }
    )*};
}
blamed!(
    slim_core::CoreError,
    slim_quant::QuantError,
    slim_prune::PruneError,
    slim_distill::DistillError,
    slim_nas::NasError,
    slim_onnx::OnnxError,
    slim_dist::DistError,
    slim_latency::LatencyError,
    slim_pipeline::PipelineError
);

/// Other errors (the system's, a serializer's) are failures, status 1.
macro_rules! failed {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                Failure { code: 1, error: e.into() }
            }
        }
    )*};
}
failed!(
    anyhow::Error,
    std::io::Error,
    serde_json::Error,
    candle_core::Error
);

/// An input error (exit status 2) with a message.
pub fn input_error(msg: impl std::fmt::Display) -> Failure {
    Failure {
        code: 2,
        error: anyhow::anyhow!("{msg}"),
    }
}

/// Keeps mimalloc's memory mapped and committed once it has it, for a binary whose global
/// allocator is `mimalloc::MiMalloc`; call it first thing in `main`.
///
/// A training step frees and allocates tensors of megabytes each, node after node. By
/// default mimalloc purges freed memory after a delay and commits arena memory on demand, so
/// those tensors keep coming back as fresh pages that the kernel must fault in and zero:
/// training MobileNetV2 (width 0.5) on 640 Fashion-MNIST images took 150-270 thousand minor
/// page faults by default and about 2 thousand with these settings. The cost is that the
/// process keeps its peak memory until it exits, which suits a command that runs one job.
pub fn tune_allocator() {
    // Indices of mimalloc 3's `mi_option_t`, which `libmimalloc-sys` does not name; the
    // allocator test reads them back.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: setting an option only stores a value that mimalloc reads when it next needs it.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

// The README's Rust example runs as a doctest of this crate, which depends on every method
// crate it uses.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExample;

/// The `slim` command line as clap describes it: every command and option (docs/cli.md's
/// option tables are rendered from it).
pub fn command() -> clap::Command {
    Cli::command()
}

/// Parses the command line, runs the command and reports its error, if any.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let augment = match cli.augment.as_deref().map(slim_core::data::Augment::parse) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(e)) => {
            eprintln!("slim: error: --augment: {e}");
            return ExitCode::from(2);
        }
    };
    let options = slim_core::data::DataOptions {
        val_fraction: cli.val_fraction,
        skip_bad_images: cli.skip_bad_images,
        augment,
        cache_mb: cli.cache_mb,
        shape: None,
    };
    if let Err(e) = options.check() {
        eprintln!("slim: error: --val-fraction: {e}");
        return ExitCode::from(2);
    }
    common::set_data_options(options);
    let result = match cli.command {
        Command::Compress(args) => compress::run(args),
        Command::Train(args) => train::run_train(args),
        Command::Eval(args) => train::run_eval(args),
        Command::Run(args) => run::run(args),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
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

#[cfg(test)]
mod tests {
    /// The option indices `tune_allocator` uses are the options it means: a child process
    /// given each option through mimalloc's own environment variable reads it back at that
    /// index.
    #[test]
    fn allocator_option_indices() {
        const PROBE: &str = "SLIM_ALLOCATOR_PROBE";
        if std::env::var_os(PROBE).is_some() {
            // SAFETY: reading an option has no preconditions.
            let (eager, purge) = unsafe {
                (
                    libmimalloc_sys::mi_option_get(4),
                    libmimalloc_sys::mi_option_get(15),
                )
            };
            assert_eq!((eager, purge), (3, 1234));
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::allocator_option_indices"])
            .env(PROBE, "1")
            .env("MIMALLOC_ARENA_EAGER_COMMIT", "3")
            .env("MIMALLOC_PURGE_DELAY", "1234")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the child read other values back: {stdout}"
        );
    }
}
