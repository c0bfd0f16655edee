//! A pipeline's configuration: typed TOML sections (`[model]`, `[data]`, `[train]`,
//! `[[strategy]]`, `[output]`), each stage's table deserialized into its method's own options,
//! and errors that name the key and its line.

use std::path::PathBuf;

use serde::Deserialize;
use slim_core::data::DEFAULT_SPEC;
use slim_core::pipeline::Strategy;
use slim_core::search::CostModel;
use slim_core::train::{OptimizerKind, Schedule, TrainConfig};
use slim_core::zoo;
use slim_distill::run::DistillOptions;
use slim_distill::strategy::DistillStrategy;
use slim_nas::run::NasOptions;
use slim_nas::strategy::NasStrategy;
use slim_prune::strategy::{Choice, PruneOptions, PruneStrategy};
use slim_quant::strategy::{PtqOptions, PtqStrategy, QatOptions, QatStrategy};

use crate::{invalid, Result};

/// The whole configuration file.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    #[serde(default)]
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    /// The stages' tables, in order (each read into its method's options when parsed).
    #[serde(default)]
    pub strategy: Vec<toml::Table>,
    #[serde(default)]
    pub output: OutputSection,
}

/// `[model]`: a zoo network trained first, or a model file.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub zoo: Option<String>,
    pub file: Option<PathBuf>,
    #[serde(default = "one")]
    pub width: f64,
}

fn one() -> f64 {
    1.0
}

/// `[data]`: a data spec, and how many training images to use.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    #[serde(default = "default_spec")]
    pub spec: String,
    /// Train on the first N training images only.
    pub limit: Option<usize>,
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

/// `[train]`: the recipe of every stage that trains (unless the stage says otherwise); what
/// is not given is [`TrainConfig`]'s default.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub batch_size: Option<usize>,
    pub optimizer: Option<String>,
    pub schedule: Option<String>,
    pub momentum: Option<f64>,
    pub nesterov: Option<bool>,
    pub weight_decay: Option<f64>,
    pub warmup_epochs: Option<usize>,
    pub seed: Option<u64>,
}

impl TrainSection {
    /// The checked training configuration.
    pub fn config(&self) -> slim_core::Result<TrainConfig> {
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

/// `[output]`: the folder, and latency tables for the report's estimates.
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    #[serde(default = "default_out")]
    pub dir: PathBuf,
    /// Latency tables (one f32, one int8 at most): the report estimates each stage's latency
    /// from the table of its runtime.
    #[serde(default)]
    pub latency_tables: Vec<PathBuf>,
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

/// The model a stage starts from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Source {
    /// The model the stage before it produced (the default).
    Previous,
    /// The model of an earlier stage: 0 is the baseline, `n` the n-th strategy.
    Stage(usize),
    /// The baseline's zoo architecture with fresh weights from the pipeline's seed (to train a
    /// network from scratch another way, say by distillation, beside the baseline).
    Init,
}

/// One stage: its row name (its `name`, or its kind), where it starts, and its method.
pub struct Stage {
    pub name: String,
    pub source: Source,
    pub strategy: Box<dyn Strategy>,
}

/// A checked pipeline: the configuration, its recipe, its stages and the report's tables.
pub struct Pipeline {
    /// The configuration's text (its fingerprint ties an output folder to it).
    pub text: String,
    pub config: Config,
    pub train: TrainConfig,
    pub stages: Vec<Stage>,
    /// The report's latency tables, read and checked with the configuration.
    pub tables: Vec<slim_latency::Table>,
}

impl Pipeline {
    /// Parses and checks a configuration (the model file and the latency tables it names are
    /// read); `origin` names it in messages, which give the line of a stage's offending key.
    pub fn parse(text: &str, origin: &str) -> Result<Pipeline> {
        let config: Config = toml::from_str(text).map_err(|e| invalid(format!("{origin}: {e}")))?;
        check_model(&config, origin)?;
        let tables = report_tables(&config, origin)?;
        let train = config
            .train
            .config()
            .map_err(|e| invalid(format!("{origin}: [train]: {e}")))?;
        let mut stages: Vec<Stage> = Vec::new();
        for (i, table) in config.strategy.iter().enumerate() {
            let at = |key: Option<&str>| {
                strategy_line(text, i, key)
                    .map(|l| format!("{origin}, line {l}"))
                    .unwrap_or_else(|| origin.to_string())
            };
            stages.push(stage(i, table.clone(), &config, &stages, &at)?);
        }
        Ok(Pipeline {
            text: text.to_string(),
            config,
            train,
            stages,
            tables,
        })
    }

    /// The kinds of the stages' strategies, in order.
    pub fn kinds(&self) -> Vec<String> {
        self.stages
            .iter()
            .map(|s| s.strategy.kind().to_string())
            .collect()
    }

    /// The configuration text's hash (FNV-1a, as every fingerprint of Slim's).
    pub fn fingerprint(&self) -> String {
        let mut h = slim_core::model::Fnv::new();
        h.write(self.text.as_bytes());
        format!("{:016x}", h.finish())
    }
}

/// The `i`-th `[[strategy]]` table as a stage (`at` says where a key is).
fn stage(
    i: usize,
    mut table: toml::Table,
    config: &Config,
    stages: &[Stage],
    at: &dyn Fn(Option<&str>) -> String,
) -> Result<Stage> {
    let kind = match table.remove("kind") {
        Some(toml::Value::String(k)) => k,
        Some(_) => {
            return Err(invalid(format!(
                "{}: `kind` must be a string",
                at(Some("kind"))
            )))
        }
        None => {
            return Err(invalid(format!(
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
            return Err(invalid(format!(
                "{}: `name` must be a string of 1 to 40 letters, digits, spaces and .+-_ (it \
                 names the stage's row and files)",
                at(Some("name"))
            )))
        }
    };
    let name_at = || at(if named { Some("name") } else { None });
    if name == "baseline" || name == "init" {
        return Err(invalid(format!(
            "{}: `name = \"{name}\"` is reserved (`from` uses it); choose another name",
            name_at()
        )));
    }
    let source = stage_source(table.remove("from"), config, stages, at)?;
    if stages.iter().any(|s| s.name == name) {
        return Err(invalid(format!(
            "{}: two stages are named \"{name}\"; give one a `name` of its own",
            name_at()
        )));
    }
    Ok(Stage {
        name,
        source,
        strategy: build_strategy(&kind, table, at)?,
    })
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

/// Characters a stage's `name` may use (it also names the stage's files).
fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " .+-_".contains(c))
        && name.trim() == name
}

/// `[model]`: exactly one of a zoo name and an existing file.
fn check_model(config: &Config, origin: &str) -> Result<()> {
    match (&config.model.zoo, &config.model.file) {
        (Some(z), None) if !zoo::NAMES.contains(&z.as_str()) => Err(invalid(format!(
            "{origin}: [model] zoo = \"{z}\" is not a zoo model ({})",
            zoo::NAMES.join(", ")
        ))),
        (None, Some(f)) if !f.is_file() => Err(invalid(format!(
            "{origin}: [model] file {} does not exist",
            f.display()
        ))),
        (Some(_), None) | (None, Some(_)) => Ok(()),
        _ => Err(invalid(format!(
            "{origin}: [model] needs exactly one of `zoo` and `file`"
        ))),
    }
}

/// `[output] latency_tables`, read and checked: one table per runtime at most.
fn report_tables(config: &Config, origin: &str) -> Result<Vec<slim_latency::Table>> {
    let mut tables = Vec::new();
    for p in &config.output.latency_tables {
        let t = slim_latency::Table::load(p)
            .map_err(|e| invalid(format!("{origin}: [output] latency_tables: {e}")))?;
        if tables
            .iter()
            .any(|o: &slim_latency::Table| o.device.runtime == t.device.runtime)
        {
            return Err(invalid(format!(
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
    stages: &[Stage],
    at: &dyn Fn(Option<&str>) -> String,
) -> Result<Source> {
    let f = match from {
        None => return Ok(Source::Previous),
        Some(toml::Value::String(f)) => f,
        Some(_) => {
            return Err(invalid(format!(
                "{}: `from` must be a string",
                at(Some("from"))
            )))
        }
    };
    if f == "baseline" {
        return Ok(Source::Stage(0));
    }
    if f == "init" {
        if config.model.zoo.is_none() {
            return Err(invalid(format!(
                "{}: `from = \"init\"` needs a zoo model in [model] (fresh weights for a model \
                 file are not defined)",
                at(Some("from"))
            )));
        }
        return Ok(Source::Init);
    }
    if let Some(j) = stages.iter().position(|s| s.name == f) {
        return Ok(Source::Stage(j + 1));
    }
    let known: Vec<String> = ["baseline".to_string(), "init".to_string()]
        .into_iter()
        .chain(stages.iter().map(|s| format!("\"{}\"", s.name)))
        .collect();
    Err(invalid(format!(
        "{}: `from = \"{f}\"` names no earlier stage (expected one of {})",
        at(Some("from")),
        known.join(", ")
    )))
}

/// The strategy kinds a stage may name.
pub const KINDS: &[&str] = &[
    "prune.uniform",
    "prune.sensitivity",
    "prune.auto",
    "quant.ptq",
    "distill",
    "quant.qat",
    "nas.sa",
    "nas.oneshot",
];

/// A stage's strategy of `kind` from the rest of its table: the table is its method's own
/// options (`at` says where a key is).
fn build_strategy(
    kind: &str,
    table: toml::Table,
    at: &dyn Fn(Option<&str>) -> String,
) -> Result<Box<dyn Strategy>> {
    fn options<T: serde::de::DeserializeOwned>(
        kind: &str,
        table: toml::Table,
        at: &dyn Fn(Option<&str>) -> String,
    ) -> Result<T> {
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| {
                let msg = e.to_string();
                // serde names the offending field between backticks.
                let key = msg.split('`').nth(1);
                invalid(format!("{}: {kind}: {}", at(key), msg.trim()))
            })
    }
    let checked = |e: &dyn std::fmt::Display| invalid(format!("{}: {e}", at(None)));
    let choice = match kind {
        "prune.uniform" => Choice::Uniform,
        "prune.sensitivity" => Choice::Sensitivity,
        "prune.auto" => Choice::Auto,
        "quant.ptq" => {
            let o: PtqOptions = options(kind, table, at)?;
            return Ok(Box::new(PtqStrategy::new(o).map_err(|e| checked(&e))?));
        }
        "quant.qat" => {
            let o: QatOptions = options(kind, table, at)?;
            return Ok(Box::new(QatStrategy::new(o).map_err(|e| checked(&e))?));
        }
        "distill" => {
            let o: DistillOptions = options(kind, table, at)?;
            return Ok(Box::new(DistillStrategy::new(o).map_err(|e| checked(&e))?));
        }
        "nas.sa" | "nas.oneshot" => {
            let o: NasOptions = options(kind, table, at)?;
            let cost = latency_cost(&o, at)?;
            let s = NasStrategy::new(kind == "nas.oneshot", o, cost).map_err(|e| checked(&e))?;
            return Ok(Box::new(s));
        }
        other => {
            return Err(invalid(format!(
                "{}: unknown strategy `{other}` (expected {})",
                at(Some("kind")),
                expected_kinds()
            )))
        }
    };
    let o: PruneOptions = options(kind, table, at)?;
    Ok(Box::new(
        PruneStrategy::new(choice, o).map_err(|e| checked(&e))?,
    ))
}

/// "prune.uniform, ..., nas.sa or nas.oneshot".
fn expected_kinds() -> String {
    let (last, rest) = KINDS.split_last().unwrap_or((&"", &[]));
    format!("{} or {last}", rest.join(", "))
}

/// A search stage's latency table, read and checked as an f32 table, as its cost model.
fn latency_cost(
    o: &NasOptions,
    at: &dyn Fn(Option<&str>) -> String,
) -> Result<Option<Box<dyn CostModel + Send>>> {
    let Some(p) = &o.latency_table else {
        return Ok(None);
    };
    let bad =
        |e: slim_latency::LatencyError| invalid(format!("{}: {e}", at(Some("latency_table"))));
    let cost = slim_latency::LatencyCost::load(p, o.fallback).map_err(bad)?;
    Ok(Some(Box::new(cost)))
}
