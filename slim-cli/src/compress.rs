//! `slim compress`: a pipeline of strategies from a TOML file, run in order, with a results
//! table and a report in the output folder. The strategies themselves live in the method
//! crates; this module parses the configuration, runs the stages, and keeps the state that
//! lets a stopped pipeline resume.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;
use slim_core::analysis::{analyze, human};
use slim_core::data::DEFAULT_SPEC;
use slim_core::io::write_atomic;
use slim_core::pipeline::{Context, Strategy, Train};
use slim_core::search::CostModel;
use slim_core::train::{evaluate, OptimizerKind, Schedule, TrainConfig};
use slim_core::zoo::{self, ZooConfig};
use slim_core::Model;
use slim_distill::run::DistillOptions;
use slim_distill::strategy::DistillStrategy;
use slim_nas::run::NasOptions;
use slim_nas::strategy::NasStrategy;
use slim_prune::strategy::{Choice, PruneOptions, PruneStrategy};
use slim_quant::strategy::{PtqOptions, PtqStrategy, QatOptions, QatStrategy};

use crate::common::{Common, EpochBars};
use crate::output::table;
use crate::{input_error, Failure};

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

/// The pipeline `slim compress --model FILE` runs on a model file: prune 30% of its
/// multiply-adds with a fine-tuning epoch (on the labels, or reproducing the original), then
/// int8. `{file}`, `{spec}` and `{dir}` are TOML strings.
const MODEL_CONFIG: &str = r#"# The default pipeline for a model file (slim compress --model): prune 30% of its
# multiply-adds uniformly with one fine-tuning epoch (without labels, the pruned model
# learns to reproduce the original), then quantize to int8. Edit it and run it with
# `slim compress --config pipeline.toml`.
[model]
file = {file}

[data]
spec = {spec}

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
dir = {dir}
"#;

/// The file name of the int8 ONNX export that `slim compress --model` writes.
const ONNX_EXPORT: &str = "model.int8.onnx";

#[derive(Args)]
pub struct CompressArgs {
    /// The pipeline configuration (TOML); default: a built-in pipeline on the bundled data.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Compress this model file (.safetensors, or .onnx) with the default pipeline for a
    /// model: prune 30% of its MACs with one fine-tuning epoch, quantize to int8, and export
    /// the int8 model for ONNX Runtime (QDQ, model.int8.onnx in the output folder, beside
    /// pipeline.toml, the configuration it ran). Without labels (--data unlabeled:DIR) the
    /// fine-tuning reproduces the original, and the table gives the agreement with it.
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    #[arg(long, requires = "model", help = crate::common::data_help(
        "--model: the data (default: the data the model was trained on, from its file, else \
         the bundled MNIST subset)"))]
    pub data: Option<String>,
    /// Only check the configuration.
    #[arg(long)]
    pub check: bool,
    /// Continue a stopped pipeline in its output folder.
    #[arg(long)]
    pub resume: bool,
    /// Start over in an output folder that holds another (or this) pipeline's results.
    #[arg(long)]
    pub force: bool,
    /// The output folder (overrides the configuration's).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Config {
    model: ModelSection,
    #[serde(default)]
    data: DataSection,
    #[serde(default)]
    train: TrainSection,
    #[serde(default)]
    strategy: Vec<toml::Table>,
    #[serde(default)]
    output: OutputSection,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    zoo: Option<String>,
    file: Option<PathBuf>,
    #[serde(default = "one")]
    width: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct DataSection {
    #[serde(default = "default_spec")]
    spec: String,
    /// Train on the first N training images only.
    limit: Option<usize>,
}

fn default_spec() -> String {
    DEFAULT_SPEC.into()
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            spec: default_spec(),
            limit: None,
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct TrainSection {
    epochs: Option<usize>,
    lr: Option<f64>,
    batch_size: Option<usize>,
    optimizer: Option<String>,
    schedule: Option<String>,
    momentum: Option<f64>,
    nesterov: Option<bool>,
    weight_decay: Option<f64>,
    warmup_epochs: Option<usize>,
    seed: Option<u64>,
}

impl TrainSection {
    fn config(&self) -> Result<TrainConfig, Failure> {
        let d = TrainConfig::default();
        let cfg = TrainConfig {
            epochs: self.epochs.unwrap_or(d.epochs),
            lr: self.lr.unwrap_or(d.lr),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            optimizer: match &self.optimizer {
                Some(o) => o.parse::<OptimizerKind>()?,
                None => d.optimizer,
            },
            schedule: match &self.schedule {
                Some(s) => s.parse::<Schedule>()?,
                None => d.schedule.clone(),
            },
            momentum: self.momentum.unwrap_or(d.momentum),
            nesterov: self.nesterov.unwrap_or(d.nesterov),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            warmup_epochs: self.warmup_epochs.unwrap_or(d.warmup_epochs),
            seed: self.seed.unwrap_or(d.seed),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct OutputSection {
    #[serde(default = "default_out")]
    dir: PathBuf,
    /// Latency tables (one f32, one int8 at most): the report estimates each stage's latency
    /// from the table of its runtime.
    #[serde(default)]
    latency_tables: Vec<PathBuf>,
}

fn default_out() -> PathBuf {
    PathBuf::from("slim-out")
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: default_out(),
            latency_tables: Vec::new(),
        }
    }
}

/// The line (1-based) of the `n`-th `[[strategy]]` table's `key`, for error messages.
fn strategy_line(text: &str, n: usize, key: Option<&str>) -> Option<usize> {
    let mut seen = 0;
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == "[[strategy]]" && {
                seen += 1;
                seen == n + 1
            };
            if inside && key.is_none() {
                return Some(i + 1);
            }
            continue;
        }
        if inside {
            if let Some(k) = key {
                if t.split('=').next().map(str::trim) == Some(k) {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// The model a stage starts from.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    /// The model the stage before it produced (the default).
    Previous,
    /// The model of an earlier stage: 0 is the baseline, `n` the n-th strategy.
    Stage(usize),
    /// The baseline's zoo architecture with fresh weights from the pipeline's seed (to train a
    /// network from scratch another way, say by distillation, beside the baseline).
    Init,
}

/// Characters a stage's `name` may use (it also names the stage's files).
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " .+-_".contains(c))
        && name.trim() == name
}

/// A checked pipeline: the configuration and its strategies.
struct Pipeline {
    config: Config,
    train: TrainConfig,
    strategies: Vec<Box<dyn Strategy>>,
    /// Each strategy's row name (its `name`, or its kind) and the model it starts from.
    stages: Vec<(String, Source)>,
    /// The report's latency tables, read and checked with the configuration.
    tables: Vec<slim_latency::Table>,
}

/// `[model]`: exactly one of a zoo name and an existing file.
fn check_model(config: &Config, origin: &str) -> Result<(), Failure> {
    match (&config.model.zoo, &config.model.file) {
        (Some(z), None) => {
            if !zoo::NAMES.contains(&z.as_str()) {
                return Err(input_error(format!(
                    "{origin}: [model] zoo = \"{z}\" is not a zoo model ({})",
                    zoo::NAMES.join(", ")
                )));
            }
        }
        (None, Some(f)) => {
            if !f.is_file() {
                return Err(input_error(format!(
                    "{origin}: [model] file {} does not exist",
                    f.display()
                )));
            }
        }
        _ => {
            return Err(input_error(format!(
                "{origin}: [model] needs exactly one of `zoo` and `file`"
            )))
        }
    }
    Ok(())
}

/// `[output] latency_tables`, read and checked: one table per runtime at most.
fn report_tables(config: &Config, origin: &str) -> Result<Vec<slim_latency::Table>, Failure> {
    let mut tables = Vec::new();
    for p in &config.output.latency_tables {
        let t = slim_latency::Table::load(p)
            .map_err(|e| input_error(format!("{origin}: [output] latency_tables: {e}")))?;
        if tables
            .iter()
            .any(|o: &slim_latency::Table| o.device.runtime == t.device.runtime)
        {
            return Err(input_error(format!(
                "{origin}: [output] latency_tables: two tables of the {} runtime",
                t.device.runtime
            )));
        }
        tables.push(t);
    }
    Ok(tables)
}

/// Where a stage starts (`from`): the stage before, a named earlier stage, the baseline, or
/// fresh weights (`init`, zoo models only).
fn stage_source(
    from: Option<toml::Value>,
    config: &Config,
    stages: &[(String, Source)],
    at: &dyn Fn(Option<&str>) -> String,
) -> Result<Source, Failure> {
    Ok(match from {
        None => Source::Previous,
        Some(toml::Value::String(f)) => {
            if f == "baseline" {
                Source::Stage(0)
            } else if f == "init" {
                if config.model.zoo.is_none() {
                    return Err(input_error(format!(
                        "{}: `from = \"init\"` needs a zoo model in [model] (fresh \
                             weights for a model file are not defined)",
                        at(Some("from"))
                    )));
                }
                Source::Init
            } else if let Some(j) = stages.iter().position(|(n, _)| *n == f) {
                Source::Stage(j + 1)
            } else {
                let known: Vec<String> = std::iter::once("baseline".to_string())
                    .chain(std::iter::once("init".to_string()))
                    .chain(stages.iter().map(|(n, _)| format!("\"{n}\"")))
                    .collect();
                return Err(input_error(format!(
                    "{}: `from = \"{f}\"` names no earlier stage (expected one of {})",
                    at(Some("from")),
                    known.join(", ")
                )));
            }
        }
        Some(_) => {
            return Err(input_error(format!(
                "{}: `from` must be a string",
                at(Some("from"))
            )))
        }
    })
}

/// A stage's strategy of `kind` from the rest of its table (`at` says where a key is).
fn build_strategy(
    kind: &str,
    table: toml::Table,
    at: &dyn Fn(Option<&str>) -> String,
) -> Result<Box<dyn Strategy>, Failure> {
    let option_error = |e: toml::de::Error| {
        let msg = e.to_string();
        // serde names the offending field between backticks.
        let key = msg.split('`').nth(1);
        input_error(format!("{}: {kind}: {}", at(key), msg.trim()))
    };
    let choice = match kind {
        "prune.uniform" => Choice::Uniform,
        "prune.sensitivity" => Choice::Sensitivity,
        "prune.auto" => Choice::Auto,
        "quant.ptq" => {
            let options: PtqOptions = toml::Value::Table(table).try_into().map_err(option_error)?;
            let s =
                PtqStrategy::new(options).map_err(|e| input_error(format!("{}: {e}", at(None))))?;
            return Ok(Box::new(s));
        }
        "distill" => {
            let options: DistillOptions =
                toml::Value::Table(table).try_into().map_err(option_error)?;
            let s = DistillStrategy::new(options)
                .map_err(|e| input_error(format!("{}: {e}", at(None))))?;
            return Ok(Box::new(s));
        }
        "nas.sa" | "nas.oneshot" => {
            let options: NasOptions = toml::Value::Table(table).try_into().map_err(option_error)?;
            let cost: Option<Box<dyn CostModel + Send>> = match &options.latency_table {
                Some(p) => {
                    let table = slim_latency::Table::load(p)
                        .map_err(|e| input_error(format!("{}: {e}", at(Some("latency_table")))))?;
                    table
                        .check(p, slim_latency::Runtime::F32)
                        .map_err(|e| input_error(format!("{}: {e}", at(Some("latency_table")))))?;
                    Some(Box::new(slim_latency::LatencyCost {
                        table,
                        fallback: options.fallback,
                    }))
                }
                None => None,
            };
            let s = NasStrategy::new(kind == "nas.oneshot", options, cost)
                .map_err(|e| input_error(format!("{}: {e}", at(None))))?;
            return Ok(Box::new(s));
        }
        "quant.qat" => {
            let options: QatOptions = toml::Value::Table(table).try_into().map_err(option_error)?;
            let s =
                QatStrategy::new(options).map_err(|e| input_error(format!("{}: {e}", at(None))))?;
            return Ok(Box::new(s));
        }
        other => {
            return Err(input_error(format!(
                "{}: unknown strategy `{other}` (expected prune.uniform, prune.sensitivity, \
                 prune.auto, quant.ptq, distill, quant.qat, nas.sa or nas.oneshot)",
                at(Some("kind"))
            )))
        }
    };
    let options: PruneOptions = toml::Value::Table(table).try_into().map_err(option_error)?;
    let s = PruneStrategy::new(choice, options)
        .map_err(|e| input_error(format!("{}: {e}", at(None))))?;
    Ok(Box::new(s))
}

fn parse(text: &str, origin: &str) -> Result<Pipeline, Failure> {
    let config: Config = toml::from_str(text).map_err(|e| input_error(format!("{origin}: {e}")))?;
    check_model(&config, origin)?;
    let tables = report_tables(&config, origin)?;
    let train = config
        .train
        .config()
        .map_err(|f| input_error(format!("{origin}: [train]: {:#}", f.error)))?;
    let mut strategies: Vec<Box<dyn Strategy>> = Vec::new();
    let mut stages: Vec<(String, Source)> = Vec::new();
    for (i, table) in config.strategy.iter().enumerate() {
        let at = |key: Option<&str>| {
            strategy_line(text, i, key)
                .map(|l| format!("{origin}, line {l}"))
                .unwrap_or_else(|| origin.to_string())
        };
        let mut table = table.clone();
        let kind = match table.remove("kind") {
            Some(toml::Value::String(k)) => k,
            Some(_) => {
                return Err(input_error(format!(
                    "{}: `kind` must be a string",
                    at(Some("kind"))
                )))
            }
            None => {
                return Err(input_error(format!(
                    "{}: [[strategy]] {} has no `kind`",
                    at(None),
                    i + 1
                )))
            }
        };
        let named = table.contains_key("name");
        let name = match table.remove("name") {
            None => kind.clone(),
            Some(toml::Value::String(n)) if name_ok(&n) => n,
            Some(_) => {
                return Err(input_error(format!(
                    "{}: `name` must be a string of 1 to 40 letters, digits, spaces and .+-_ \
                     (it names the stage's row and files)",
                    at(Some("name"))
                )))
            }
        };
        if name == "baseline" || name == "init" {
            return Err(input_error(format!(
                "{}: `name = \"{name}\"` is reserved (`from` uses it); choose another name",
                at(if named { Some("name") } else { None })
            )));
        }
        let source = stage_source(table.remove("from"), &config, &stages, &at)?;
        if stages.iter().any(|(n, _)| *n == name) {
            return Err(input_error(format!(
                "{}: two stages are named \"{name}\"; give one a `name` of its own",
                at(if named { Some("name") } else { None })
            )));
        }
        stages.push((name, source));
        strategies.push(build_strategy(&kind, table, &at)?);
    }
    Ok(Pipeline {
        config,
        train,
        strategies,
        stages,
        tables,
    })
}

/// Checks a pipeline configuration as `slim compress --check` does (the model file and the
/// latency tables it names are read), and returns the kinds of its strategies in order.
/// `origin` names the configuration in messages.
pub fn check_config(text: &str, origin: &str) -> Result<Vec<String>, Failure> {
    let pipeline = parse(text, origin)?;
    Ok(pipeline
        .strategies
        .iter()
        .map(|s| s.kind().to_string())
        .collect())
}

/// One row of the results: a stage's model and what it measures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Row {
    name: String,
    file: PathBuf,
    /// Accuracy on the test split (data with labels).
    top1: Option<f64>,
    top5: Option<f64>,
    /// Without labels: the first output's top-1 agreement with the baseline (its cosine
    /// similarity for an output that is not a score vector), and its cosine similarity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agreement: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cosine: Option<f64>,
    macs: u64,
    params: u64,
    bytes: u64,
    seconds: f64,
    info: serde_json::Value,
    /// Estimated from the report's latency table of the model's runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
    /// Ops of the model the table lacked, estimated by its fallback fit.
    #[serde(default, skip_serializing_if = "is_zero")]
    latency_fallback_ops: usize,
    /// Measured: the median milliseconds of a batch-1 forward on Slim's runtime of the model
    /// (f32, or int8), every core, timed as `slim bench` times, every stage in one sitting
    /// after the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    measured_ms: Option<f64>,
    /// The stage the model started from, when not the one before (`init`: fresh weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The pipeline's state in its output folder: which configuration, and the finished stages.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    config: String,
    stages: Vec<Row>,
}

const STATE_FORMAT: &str = "slim-pipeline/1";
const STATE_FILE: &str = "pipeline.json";

/// The configuration text's hash (FNV-1a, as every fingerprint of Slim's).
fn fingerprint(text: &str) -> String {
    let mut h = slim_core::model::Fnv::new();
    h.write(text.as_bytes());
    format!("{:016x}", h.finish())
}

fn save_state(dir: &Path, state: &State) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(state)?;
    write_atomic(&dir.join(STATE_FILE), text.as_bytes())?;
    Ok(())
}

/// The pipeline configuration for `--model FILE` (see [`MODEL_CONFIG`]).
fn model_config(file: &Path, args: &CompressArgs) -> Result<String, Failure> {
    let model = crate::common::load_model(file, &args.common.device()?, &args.common.load)?;
    let spec = crate::common::data_spec(args.data.as_deref(), &model);
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("slim-out"));
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    Ok(MODEL_CONFIG
        .replace("{file}", &quote(&file.display().to_string()))
        .replace("{spec}", &quote(&spec))
        .replace("{dir}", &quote(&dir.display().to_string())))
}

/// The pipeline's state in `dir`: a finished or (with --resume) stopped run of the same
/// configuration (`key`), else a fresh one.
fn open_state(
    dir: &Path,
    key: String,
    stages: usize,
    args: &CompressArgs,
) -> Result<State, Failure> {
    let state_path = dir.join(STATE_FILE);
    Ok(if state_path.exists() && !args.force {
        let s: State =
            serde_json::from_str(&std::fs::read_to_string(&state_path)?).map_err(|e| {
                input_error(format!(
                    "{}: not a pipeline state: {e}",
                    state_path.display()
                ))
            })?;
        if s.format != STATE_FORMAT || s.config != key {
            return Err(input_error(format!(
                "{} holds another pipeline's results; choose another output folder, or \
                 --force to start over there",
                dir.display()
            )));
        }
        // A finished run of this pipeline is only reported again; a stopped one continues
        // when asked to.
        let finished = s.stages.len() == stages + 1;
        if !args.resume && !finished {
            return Err(input_error(format!(
                "{} holds a stopped run of this pipeline; --resume to continue it, or \
                 --force to start over",
                dir.display()
            )));
        }
        s
    } else {
        State {
            format: STATE_FORMAT.into(),
            config: key,
            stages: Vec::new(),
        }
    })
}

/// The results table of the stages, as text (returned) and as `report.md` in `dir`.
fn write_table(
    stages: &[Row],
    labeled: bool,
    with_latency: bool,
    dir: &Path,
) -> Result<String, Failure> {
    let base = stages[0].clone();
    // A pipeline with branches says where each stage started.
    let branches = stages.iter().any(|r| r.from.is_some());
    let rows: Vec<Vec<String>> = stages
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut row = vec![r.name.clone()];
            if branches {
                row.push(match (&r.from, i) {
                    (_, 0) => "-".into(),
                    (Some(f), _) => f.clone(),
                    (None, _) => stages[i - 1].name.clone(),
                });
            }
            let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.2}%", v * 100.0));
            let (first, second) = if labeled {
                (pct(r.top1), pct(r.top5))
            } else {
                (
                    pct(r.agreement),
                    r.cosine.map_or("-".into(), |c| format!("{c:.4}")),
                )
            };
            let (now, then) = if labeled {
                (r.top1, base.top1)
            } else {
                (r.agreement, base.agreement)
            };
            row.extend([
                first,
                second,
                human(r.macs),
                human(r.params),
                human(r.bytes),
                match (r.name == "baseline", now, then) {
                    (false, Some(a), Some(b)) => format!("{:+.2} pt", (a - b) * 100.0),
                    _ => "-".into(),
                },
                format!("{:.0}%", r.bytes as f64 / base.bytes.max(1) as f64 * 100.0),
            ]);
            row.push(r.measured_ms.map_or("-".into(), |ms| format!("{ms:.3}")));
            row.push(match (r.measured_ms, base.measured_ms) {
                (Some(ms), Some(b)) if ms > 0.0 => format!("{:.2}x", b / ms),
                _ => "-".into(),
            });
            if with_latency {
                row.push(match r.latency_ms {
                    Some(ms) if r.latency_fallback_ops > 0 => format!("{ms:.3} ms*"),
                    Some(ms) => format!("{ms:.3} ms"),
                    None => "-".into(),
                });
            }
            row
        })
        .collect();
    let mut header = vec!["stage"];
    if branches {
        header.push("from");
    }
    if labeled {
        header.extend(["top-1", "top-5"]);
    } else {
        header.extend(["agreement", "cosine"]);
    }
    header.extend(["MACs", "params", "size"]);
    header.push(if labeled {
        "top-1 change"
    } else {
        "agreement change"
    });
    header.push("of baseline size");
    header.extend(["ms (batch 1)", "speed-up"]);
    if with_latency {
        header.push("est. latency");
    }
    let text_table = table(&header, &rows);
    let mut md = String::from("| ");
    md.push_str(&header.join(" | "));
    md.push_str(" |\n|");
    md.push_str(&"---|".repeat(header.len()));
    md.push('\n');
    for r in &rows {
        md.push_str("| ");
        md.push_str(&r.join(" | "));
        md.push_str(" |\n");
    }
    md.push_str(&format!(
        "\nms (batch 1): the median of {BENCH_RUNS} batch-1 forwards on Slim's runtime ({} \
         kernels, {} thread(s)), every stage timed in one sitting; speed-up against the \
         baseline's.\n",
        slim_core::cpu::level().name(),
        bench_threads()
    ));
    if with_latency {
        md.push_str(
            "\nLatency estimated from the tables given (`*`: some ops by the fallback fit).\n",
        );
    }
    write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(text_table)
}

/// The zoo model of `[model]` with the weights it starts training from.
fn fresh_model(
    config: &Config,
    train: &TrainConfig,
    data: &slim_core::data::DataSplits,
    device: &candle_core::Device,
) -> Result<Model, Failure> {
    let name = config.model.zoo.as_deref().unwrap_or_default();
    let zcfg = ZooConfig::new(data.train.shape)
        .with_width(config.model.width)
        .with_classes(data.train.classes);
    let mut m = zoo::model(name, &zcfg, train.seed, device)?;
    m.provenance.insert("data".into(), config.data.spec.clone());
    Ok(m)
}

/// Every stage's batch-1 forward timed in this sitting, and its latency estimated from the
/// table of its runtime, when given.
fn time_stages(
    stages: &mut [Row],
    tables: &[slim_latency::Table],
    device: &candle_core::Device,
    args: &CompressArgs,
) -> Result<(), Failure> {
    for row in stages.iter_mut() {
        let m = crate::common::load_model(&row.file, device, &args.common.load)?;
        row.measured_ms = Some(time_batch_one(&m)?);
        let runtime = if m.int8.is_empty() {
            slim_latency::Runtime::F32
        } else {
            slim_latency::Runtime::Int8
        };
        row.latency_ms = match tables.iter().find(|t| t.device.runtime == runtime) {
            Some(t) => {
                let e = slim_latency::estimate(t, &m, true)?;
                row.latency_fallback_ops = e.fallback.len();
                Some(e.total_ms)
            }
            None => None,
        };
    }
    Ok(())
}

/// Stage 0, the baseline: read back when the state has it, else trained from the zoo or read
/// from `[model] file` (whose preprocessing the data then follows), measured and recorded.
fn baseline_stage(
    pipeline: &Pipeline,
    state: &mut State,
    data: &mut slim_core::data::DataSplits,
    dir: &Path,
    device: &candle_core::Device,
    args: &CompressArgs,
) -> Result<Model, Failure> {
    let (quiet, total) = (args.common.quiet, pipeline.strategies.len() + 1);
    let note = |msg: String| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    Ok(if let Some(row) = state.stages.first() {
        note(format!("stage 1/{total}: baseline (done)"));
        let m = crate::common::load_model(&row.file, device, &args.common.load)?;
        crate::common::adapt_data(data, &m)?;
        m
    } else {
        let t0 = Instant::now();
        let (model, info, file) = match (&pipeline.config.model.zoo, &pipeline.config.model.file) {
            (Some(name), _) => {
                note(format!("stage 1/{total}: baseline: train {name}"));
                let m = fresh_model(&pipeline.config, &pipeline.train, data, device)?;
                let mut bars = EpochBars::new(quiet);
                let mut progress = |p: &slim_core::train::Progress| bars.update(p);
                let mut ctx = Context {
                    data,
                    train: pipeline.train.clone(),
                    work_dir: dir.to_path_buf(),
                    quiet,
                    progress: &mut progress,
                    status: &|_| {},
                    baseline: None,
                };
                let (m, info) = Train { config: None }.run(m, &mut ctx)?;
                let file = dir.join("00-baseline.safetensors");
                m.save(&file)?;
                (m, info, file)
            }
            (None, Some(path)) => {
                note(format!("stage 1/{total}: baseline: {}", path.display()));
                let m = crate::common::load_model(path, device, &args.common.load)?;
                // An imported model is fed data the way it expects.
                crate::common::adapt_data(data, &m)?;
                (m, json!({}), path.clone())
            }
            (None, None) => return Err(input_error("[model] needs `zoo` or `file`")),
        };
        let row = measure(
            "baseline",
            &model,
            &file,
            data,
            t0.elapsed().as_secs_f64(),
            info,
            None,
        )?;
        state.stages.push(row);
        save_state(dir, state)?;
        model
    })
}

pub fn run(args: CompressArgs) -> Result<(), Failure> {
    let (text, origin) = match (&args.config, &args.model) {
        (Some(p), _) => (
            std::fs::read_to_string(p).map_err(|e| input_error(format!("{}: {e}", p.display())))?,
            p.display().to_string(),
        ),
        (None, Some(m)) => (
            model_config(m, &args)?,
            format!("the default pipeline for {}", m.display()),
        ),
        (None, None) => (
            DEFAULT_CONFIG.to_string(),
            "the default pipeline".to_string(),
        ),
    };
    let mut pipeline = parse(&text, &origin)?;
    if args.check {
        if args.common.json {
            outln!(
                "{}",
                crate::common::with_skipped(json!({"config": origin, "ok": true,
                       "strategies": pipeline.strategies.iter().map(|s| s.kind().to_string()).collect::<Vec<_>>()}))
            );
        } else {
            outln!(
                "{origin}: ok ({} strategies: {})",
                pipeline.strategies.len(),
                pipeline
                    .strategies
                    .iter()
                    .map(|s| s.kind().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        return Ok(());
    }
    let dir = args
        .out
        .clone()
        .unwrap_or_else(|| pipeline.config.output.dir.clone());
    let key = fingerprint(&text);
    let mut state = open_state(&dir, key, pipeline.strategies.len(), &args)?;
    std::fs::create_dir_all(&dir)
        .map_err(|e| input_error(format!("cannot create {}: {e}", dir.display())))?;
    let device = args.common.device()?;
    let mut data = crate::common::load_spec(&pipeline.config.data.spec)?;
    if let Some(n) = pipeline.config.data.limit {
        data.train = data.train.take(n);
    }
    if !data.train.is_labeled() && pipeline.config.model.zoo.is_some() {
        return Err(input_error(format!(
            "[data] spec = \"{}\" has no labels, and a zoo baseline is trained on labels; \
             without labels, start from a trained model ([model] file)",
            pipeline.config.data.spec
        )));
    }
    let quiet = args.common.quiet;
    let note = |msg: String| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    let total = pipeline.strategies.len() + 1;
    let started = Instant::now();

    let mut model = baseline_stage(&pipeline, &mut state, &mut data, &dir, &device, &args)?;

    // The baseline as its file holds it, for stages that learn from it.
    let baseline = crate::common::load_model(&state.stages[0].file, &device, &args.common.load)?;
    for (i, strategy) in pipeline.strategies.iter_mut().enumerate() {
        let stage = i + 1;
        let (name, source) = pipeline.stages[i].clone();
        let stem = format!("{stage:02}-{}", name.replace(' ', "_"));
        if let Some(row) = state.stages.get(stage) {
            note(format!("stage {}/{total}: {name} (done)", stage + 1));
            model = crate::common::load_model(&row.file, &device, &args.common.load)?;
            continue;
        }
        let from = match source {
            Source::Previous => None,
            Source::Stage(j) => Some(state.stages[j].name.clone()),
            Source::Init => Some("init".to_string()),
        };
        match &from {
            Some(f) => note(format!("stage {}/{total}: {name} (from {f})", stage + 1)),
            None => note(format!("stage {}/{total}: {name}", stage + 1)),
        }
        model = match source {
            Source::Previous => model,
            Source::Stage(j) => {
                crate::common::load_model(&state.stages[j].file, &device, &args.common.load)?
            }
            Source::Init => fresh_model(&pipeline.config, &pipeline.train, &data, &device)?,
        };
        let t0 = Instant::now();
        let work_dir = dir.join(&stem);
        std::fs::create_dir_all(&work_dir)?;
        let mut bars = EpochBars::new(quiet);
        let mut progress = |p: &slim_core::train::Progress| bars.update(p);
        let status = status_line(quiet);
        let show = |m: &str| status.set_message(m.to_string());
        let mut ctx = Context {
            data: &data,
            train: pipeline.train.clone(),
            work_dir,
            quiet,
            progress: &mut progress,
            status: &show,
            baseline: Some(&baseline),
        };
        let (next, info) = strategy.run(model, &mut ctx)?;
        status.finish_and_clear();
        let file = dir.join(format!("{stem}.safetensors"));
        next.save(&file)?;
        let mut row = measure(
            &name,
            &next,
            &file,
            &data,
            t0.elapsed().as_secs_f64(),
            info,
            Some(&baseline),
        )?;
        row.from = from;
        state.stages.push(row);
        save_state(&dir, &state)?;
        model = next;
    }

    // The report.
    let with_latency = !pipeline.tables.is_empty();
    time_stages(&mut state.stages, &pipeline.tables, &device, &args)?;
    let text_table = write_table(&state.stages, data.test.is_labeled(), with_latency, &dir)?;
    write_atomic(
        &dir.join("accuracy-size.svg"),
        plot(&state.stages).as_bytes(),
    )?;
    // A model compressed with the default pipeline for it: its configuration, and the int8
    // model for ONNX Runtime.
    let mut onnx = None;
    if args.model.is_some() {
        write_atomic(&dir.join("pipeline.toml"), text.as_bytes())?;
        if let Some(last) = state.stages.last() {
            let m = crate::common::load_model(&last.file, &device, &args.common.load)?;
            let path = dir.join(ONNX_EXPORT);
            for n in slim_onnx::export_file(&m, &path, &slim_onnx::ExportOptions::default())? {
                note(format!("warning: {n}"));
            }
            onnx = Some(path);
        }
    }
    let mut report = json!({"stages": state.stages, "out": dir});
    if let Some(p) = &onnx {
        report["onnx"] = json!(p);
    }
    let report = crate::common::with_skipped(report);
    write_atomic(
        &dir.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if args.common.json {
        outln!("{report}");
    } else {
        out!("{text_table}");
        outln!(
            "{} stages in {:.1} s; models, report.md and report.json in {}",
            state.stages.len(),
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        if let Some(p) = &onnx {
            outln!(
                "the int8 model for ONNX Runtime (QDQ): {}; the pipeline it ran: {}",
                p.display(),
                dir.join("pipeline.toml").display()
            );
        }
    }
    Ok(())
}

/// Top-1 against file size, one labelled point per stage.
fn plot(rows: &[Row]) -> String {
    use slim_core::plot::{Plot, Series};
    // Top-1, or without labels the agreement with the baseline.
    let labeled = rows.iter().any(|r| r.top1.is_some());
    let y_label = if labeled {
        "test top-1 (%)"
    } else {
        "agreement with the baseline (%)"
    };
    let mut plot = Plot::new("accuracy against size", "model file size (KB)", y_label);
    for row in rows {
        let quality = row.top1.or(row.agreement).unwrap_or(0.0);
        let point = (row.bytes as f64 / 1000.0, quality * 100.0);
        plot = plot.series(Series::points(row.name.clone(), vec![point]));
    }
    plot.to_svg()
}

/// A one-line status display on stderr (hidden with --quiet or when stderr is no terminal).
fn status_line(quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(std::time::Duration::from_millis(200));
        b
    }
}

/// Timed forwards per stage for the report's measured column.
const BENCH_RUNS: usize = 20;

/// The threads a stage's forward is timed with: every core.
fn bench_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The median milliseconds of a batch-1 forward of `model` on Slim's runtime (int8 models on
/// the int8 one), as `slim bench` measures it.
fn time_batch_one(model: &Model) -> Result<f64, Failure> {
    let kernels = (!model.int8.is_empty()).then(|| slim_quant::runtime::Int8Kernels::new(model));
    let kernels = kernels
        .as_ref()
        .map(|k| k as &dyn slim_core::exec::NodeKernels);
    let opts = slim_latency::BuildOptions {
        runs: BENCH_RUNS,
        warmup: 3,
        warmup_ms: 100.0,
    };
    Ok(slim_latency::bench(model, kernels, 1, bench_threads(), &opts)?.median_ms)
}

/// A stage's figures: accuracy on the test split, or without labels its fidelity to
/// `baseline` (`None`: the stage is the baseline).
fn measure(
    name: &str,
    model: &Model,
    file: &Path,
    data: &slim_core::data::DataSplits,
    seconds: f64,
    info: serde_json::Value,
    baseline: Option<&Model>,
) -> Result<Row, Failure> {
    let int8 = !model.int8.is_empty();
    let (mut top1, mut top5, mut agreement, mut cosine) = (None, None, None, None);
    if data.test.is_labeled() {
        // Int8 models are measured on the int8 runtime.
        let e = if int8 {
            slim_quant::runtime::evaluate(model, &data.test, &data.normalize, 256)?
        } else {
            evaluate(model, &data.test, &data.normalize, 256)?
        };
        (top1, top5) = (Some(e.top1), Some(e.top5));
    } else if let Some(b) = baseline {
        let f = if int8 {
            let kernels = slim_quant::runtime::Int8Kernels::new(model);
            slim_core::train::fidelity_with(model, b, &data.test, &data.normalize, 256, &|m, x| {
                Ok(vec![slim_quant::runtime::forward_with(m, &kernels, x)?])
            })?
        } else {
            slim_core::train::fidelity(model, b, &data.test, &data.normalize, 256)?
        };
        agreement = Some(f.headline());
        cosine = f.outputs.first().map(|o| o.cosine);
    } else {
        (agreement, cosine) = (Some(1.0), Some(1.0));
    }
    let stats = analyze(&model.graph);
    Ok(Row {
        name: name.into(),
        file: file.to_path_buf(),
        top1,
        top5,
        agreement,
        cosine,
        macs: stats.macs,
        params: stats.params,
        bytes: std::fs::metadata(file)?.len(),
        seconds,
        info,
        latency_ms: None,
        latency_fallback_ops: 0,
        measured_ms: None,
        from: None,
    })
}
