//! `slim bench`: how fast a model file runs on Slim's runtime.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;
use serde_json::json;
use slim_core::exec::NodeKernels;
use slim_latency::{bench, BenchRun, BuildOptions};
use slim_quant::runtime::Int8Kernels;

use crate::common::{load_model, LoadArgs};
use crate::{input_error, Failure};

#[derive(Args)]
pub struct BenchArgs {
    /// A model file (.safetensors, float or int8, or .onnx). Int8 files run on the int8
    /// runtime, float ones on the f32 runtime.
    pub file: PathBuf,
    /// Images per forward; repeat the flag to time several batch sizes.
    #[arg(long = "batch", default_values_t = [1usize])]
    pub batches: Vec<usize>,
    /// Threads; repeat the flag to time several counts (default: every core).
    #[arg(long = "threads")]
    pub threads: Vec<usize>,
    /// Untimed forwards first, per batch size and thread count...
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// ...and at least this many milliseconds of them.
    #[arg(long, default_value_t = 300.0)]
    pub warmup_ms: f64,
    /// Timed forwards, per batch size and thread count.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Print one JSON object with the results on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub load: LoadArgs,
}

pub fn run(args: BenchArgs) -> Result<(), Failure> {
    if let Some(b) = args.batches.iter().find(|&&b| b == 0) {
        return Err(input_error(format!("--batch {b}: must be at least 1")));
    }
    if let Some(t) = args.threads.iter().find(|&&t| t == 0) {
        return Err(input_error(format!("--threads {t}: must be at least 1")));
    }
    let model = load_model(&args.file, &Device::Cpu, &args.load)?;
    let int8 = !model.int8.is_empty();
    let kernels = int8.then(|| Int8Kernels::new(&model));
    let kernels = kernels.as_ref().map(|k| k as &dyn NodeKernels);
    let threads = if args.threads.is_empty() {
        vec![std::thread::available_parallelism().map_or(1, |n| n.get())]
    } else {
        args.threads.clone()
    };
    let opts = BuildOptions {
        runs: args.runs,
        warmup: args.warmup,
        warmup_ms: args.warmup_ms,
    };
    let mut runs: Vec<BenchRun> = Vec::new();
    for &t in &threads {
        for &b in &args.batches {
            runs.push(bench(&model, kernels, b, t, &opts)?);
        }
    }
    let runtime = if int8 { "int8" } else { "f32" };
    let peak = slim_latency::peak_rss_bytes();
    if args.json {
        outln!(
            "{}",
            json!({"file": args.file, "runtime": runtime, "input": model.input_shape(),
                   "cpu": slim_core::cpu::level().name(), "runs": runs, "peak_rss_bytes": peak})
        );
        return Ok(());
    }
    outln!(
        "{} on the {runtime} runtime ({} kernels), input {:?}, median of {} forwards after {} (at least {} ms) untimed:",
        args.file.display(),
        slim_core::cpu::level().name(),
        model.input_shape(),
        args.runs,
        args.warmup,
        args.warmup_ms
    );
    outln!("{}", BenchRun::table(&runs).trim_end());
    if let Some(p) = peak {
        outln!("peak memory {:.1} MB", p as f64 / 1e6);
    }
    Ok(())
}
