//! `slim latency build|estimate|validate`: per-device latency tables.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use slim_core::exec::NodeKernels;
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;
use slim_latency::{
    build, estimate, validate, BuildOptions, Runtime, Subject, Table, TimingProgress,
};
use slim_quant::runtime::Int8Kernels;

use crate::common::Common;
use crate::{input_error, Failure};

#[derive(Subcommand)]
pub enum LatencyCommand {
    /// Time every op of the given models on this machine and write (or add to) a table.
    Build(BuildArgs),
    /// A model's latency from a table.
    Estimate(EstimateArgs),
    /// Estimated against measured latency of whole models, and the mean absolute error.
    Validate(ValidateArgs),
}

/// The models to time.
#[derive(Args, Clone, Debug)]
pub struct Models {
    /// A model file (repeatable).
    #[arg(long = "model")]
    pub models: Vec<PathBuf>,
    /// A zoo model, NAME or NAME@CxHxW (default input 1x28x28; repeatable). On the int8
    /// runtime it is quantized first, with scales from a fixed pattern of pixels.
    #[arg(long = "zoo")]
    pub zoo: Vec<String>,
    /// A search space of `slim nas`, NAME or NAME@CxHxW (repeatable): its hand-made network,
    /// its cheapest candidate and --space-samples random ones, so that a table covers most of
    /// what a search under a latency limit will price.
    #[arg(long = "space")]
    pub spaces: Vec<String>,
    /// The width of the --space networks (as `slim nas sa --width`).
    #[arg(long, default_value_t = 1.0)]
    pub space_width: f64,
    /// Random candidates per --space.
    #[arg(long, default_value_t = 20)]
    pub space_samples: usize,
}

#[derive(Args, Clone, Debug)]
pub struct Timing {
    #[command(flatten)]
    pub build: BuildOptions,
    /// Estimate ops the table lacks from a line fitted on the table's ops of the same kind.
    #[arg(long)]
    pub fallback: bool,
}

#[derive(Args)]
pub struct BuildArgs {
    /// The table file; an existing table is added to (same runtime, threads and batch).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub models: Models,
    /// f32 or int8.
    #[arg(long, default_value = "f32")]
    pub runtime: String,
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub timing: Timing,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct EstimateArgs {
    pub model: PathBuf,
    #[arg(long)]
    pub table: PathBuf,
    #[arg(long)]
    pub fallback: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args)]
pub struct ValidateArgs {
    #[arg(long)]
    pub table: PathBuf,
    #[command(flatten)]
    pub models: Models,
    #[command(flatten)]
    pub timing: Timing,
    #[command(flatten)]
    pub common: Common,
}

pub fn run(cmd: LatencyCommand) -> Result<(), Failure> {
    match cmd {
        LatencyCommand::Build(a) => run_build(a),
        LatencyCommand::Estimate(a) => run_estimate(a),
        LatencyCommand::Validate(a) => run_validate(a),
    }
}

fn kernels(runtime: Runtime) -> Option<&'static dyn NodeKernels> {
    match runtime {
        Runtime::F32 => None,
        Runtime::Int8 => Some(&Int8Kernels::ON_THE_FLY),
    }
}

/// `NAME` or `NAME@CxHxW`, given with `flag`.
/// `NAME@CxHxW` (the input 1x28x28 when not given).
fn zoo_spec(flag: &str, spec: &str) -> Result<(String, [usize; 3]), Failure> {
    let (name, shape) = spec.split_once('@').unwrap_or((spec, "1x28x28"));
    let input = crate::info::parse_shape(&format!("{flag} {spec}:"), shape)?;
    Ok((name.to_string(), input))
}

fn load_models(
    m: &Models,
    runtime: Runtime,
    load: &crate::common::LoadArgs,
) -> Result<Vec<(String, Model)>, Failure> {
    if m.models.is_empty() && m.zoo.is_empty() && m.spaces.is_empty() {
        return Err(input_error(
            "give at least one --model FILE, --zoo NAME or --space NAME",
        ));
    }
    let device = candle_core::Device::Cpu;
    let mut out = Vec::new();
    for path in &m.models {
        out.push((
            path.display().to_string(),
            crate::common::load_model(path, &device, load)?,
        ));
    }
    let prepare = |model: Model| -> Result<Model, Failure> {
        Ok(match runtime {
            Runtime::F32 => model,
            Runtime::Int8 => slim_quant::ptq::quantize_for_timing(&model)?,
        })
    };
    let shape = |input: [usize; 3]| format!("{}x{}x{}", input[0], input[1], input[2]);
    for spec in &m.zoo {
        let (name, input) = zoo_spec("--zoo", spec)?;
        let model = zoo::model(&name, &ZooConfig::new(input), 0, &device)?;
        out.push((format!("{name}@{}", shape(input)), prepare(model)?));
    }
    let spaces = slim_nas::Spaces::builtin();
    for spec in &m.spaces {
        let (name, input) = zoo_spec("--space", spec)?;
        let cfg = ZooConfig::new(input).with_width(m.space_width);
        let space = spaces.build(&name, &cfg)?;
        let picks = space.timing_picks(m.space_samples);
        for (label, tokens) in picks {
            let model = Model::init(space.graph(&tokens)?, 0, &device)?;
            out.push((format!("{name}@{}:{label}", shape(input)), prepare(model)?));
        }
    }
    Ok(out)
}

fn subjects(models: &[(String, Model)]) -> Vec<Subject<'_>> {
    models
        .iter()
        .map(|(name, model)| Subject {
            name: name.clone(),
            model,
        })
        .collect()
}

fn progress_printer(quiet: bool) -> impl FnMut(&TimingProgress) + Send {
    move |p: &TimingProgress| {
        if !quiet && p.done == p.total {
            eprintln!("timed {} ({} runs)", p.model, p.total);
        }
    }
}

fn run_build(a: BuildArgs) -> Result<(), Failure> {
    let runtime: Runtime = a.runtime.parse()?;
    crate::common::check_out_dir("--out", &a.out)?;
    if a.threads == 0 || a.batch == 0 {
        return Err(input_error("--threads and --batch must be at least 1"));
    }
    let table = Table::open_or_new(&a.out, runtime, a.threads, a.batch)?;
    let models = load_models(&a.models, runtime, &a.common.load)?;
    let subjects = subjects(&models);
    let opts = a.timing.build.clone();
    let mut progress = progress_printer(a.common.quiet);
    let (table, report) = build(table, &subjects, kernels(runtime), &opts, &mut progress)?;
    table.save(&a.out)?;
    if a.common.json {
        outln!(
            "{}",
            serde_json::json!({"table": a.out, "entries": table.entries.len(), "added": report.added, "remeasured": report.remeasured, "seconds": report.seconds})
        );
    } else {
        outln!(
            "{}: {} op signatures ({} new, {} measured again) on {}, in {:.1} s",
            a.out.display(),
            table.entries.len(),
            report.added,
            report.remeasured,
            table.device.describe(),
            report.seconds
        );
    }
    Ok(())
}

fn run_estimate(a: EstimateArgs) -> Result<(), Failure> {
    let table = Table::load(&a.table)?;
    let model = crate::common::load_model(&a.model, &candle_core::Device::Cpu, &a.common.load)?;
    let e = estimate(&table, &model, a.fallback)?;
    if a.common.json {
        outln!("{}", serde_json::to_string(&e)?);
    } else {
        let model = a.model.display().to_string();
        out!("{}", e.describe(&model, &table.device.describe()));
    }
    Ok(())
}

fn run_validate(a: ValidateArgs) -> Result<(), Failure> {
    let table = Table::load(&a.table)?;
    let runtime = table.device.runtime;
    let models = load_models(&a.models, runtime, &a.common.load)?;
    let subjects = subjects(&models);
    let opts = a.timing.build.clone();
    let mut progress = progress_printer(a.common.quiet);
    let v = validate(
        &table,
        &subjects,
        kernels(runtime),
        &opts,
        a.timing.fallback,
        &mut progress,
    )?;
    if a.common.json {
        outln!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    outln!("on {}", table.device.describe());
    out!("{}", v.table());
    Ok(())
}
