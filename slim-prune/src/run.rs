//! One entrance to pruning: [`run`] checks the options, chooses the per-group ratios by the
//! method asked for (uniform, from sensitivities, or by a search), prunes, and reports. It is
//! the call behind `slim prune` and the pipeline's `prune.*` stages; fine-tuning after it is
//! `slim-core`'s training loop, with the caller's recipe.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;
use slim_core::compare::{measure, Comparison, Figures};
use slim_core::data::DataSplits;
use slim_core::pipeline::Finetuning;
use slim_core::search::SearchProgress;
use slim_core::study::{StudyStore, WorkerOptions, WorkerProgress};
use slim_core::train::{train, Fidelity, Schedule, Top1, TrainConfig, TrainOptions, TrainReport};
use slim_core::Model;

use crate::auto::{self, AutoConfig, Method};
use crate::pruner::{check_ratio, check_reduction, kept_channels, Calibration, Skipped};
use crate::sensitivity::{self, default_ratios, EvalData, Sensitivities};
use crate::{Criterion, PruneError, Pruner, Ratios, Result};

/// Which way the per-group ratios are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Choice {
    /// One ratio for every group in scope.
    Uniform,
    /// Per-group ratios from sensitivities (given, or measured here).
    Sensitivity,
    /// A search over per-group ratios under the FLOPs limit.
    Auto,
}

impl Choice {
    /// `uniform`, `sensitivity` or `auto`.
    pub fn name(self) -> &'static str {
        match self {
            Choice::Uniform => "uniform",
            Choice::Sensitivity => "sensitivity",
            Choice::Auto => "auto",
        }
    }
}

/// The options of pruning: a pipeline stage's table, and `slim prune`'s flags of the same
/// names. The defaults are here and nowhere else.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneOptions {
    /// One ratio for every group (uniform only).
    pub ratio: Option<f64>,
    /// The FLOPs reduction to reach.
    pub flops_reduction: Option<f64>,
    #[serde(default)]
    pub criterion: Criterion,
    #[serde(default)]
    pub scope: Vec<String>,
    /// Training images that recalibrate batch norms after pruning.
    #[serde(default = "default_calibration")]
    pub bn_calibration: usize,
    /// Test images for sensitivities and search rewards (default: all).
    pub eval_samples: Option<usize>,
    /// Ratios of the sensitivity analysis.
    #[serde(default = "default_ratios")]
    pub ratios: Vec<f64>,
    /// Candidates of the automatic search.
    #[serde(default = "default_trials")]
    pub trials: usize,
    /// `annealing` or `evolution`.
    #[serde(default = "default_search")]
    pub search: String,
    /// Fine-tuning epochs after pruning (with the pipeline's recipe).
    #[serde(default)]
    pub finetune_epochs: usize,
    /// Fine-tuning learning rate (default: the recipe's).
    pub lr: Option<f64>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            ratio: None,
            flops_reduction: None,
            criterion: Criterion::default(),
            scope: Vec::new(),
            bn_calibration: default_calibration(),
            eval_samples: None,
            ratios: default_ratios(),
            trials: default_trials(),
            search: default_search(),
            finetune_epochs: 0,
            lr: None,
        }
    }
}

fn default_calibration() -> usize {
    640
}
fn default_trials() -> usize {
    30
}
fn default_search() -> String {
    "annealing".into()
}

impl PruneOptions {
    /// Checks the options for `choice` before any work is done; `what` names the caller in
    /// the messages (a stage's kind, or `slim prune`).
    pub fn validate(&self, choice: Choice, what: &str) -> Result<()> {
        match (choice, self.ratio, self.flops_reduction) {
            (Choice::Uniform, Some(r), None) => check_ratio(r)?,
            (_, None, Some(f)) => check_reduction(f)?,
            (Choice::Uniform, _, _) => {
                return Err(PruneError::Invalid(format!(
                    "{what}: give exactly one of `ratio` and `flops_reduction`"
                )))
            }
            _ => {
                return Err(PruneError::Invalid(format!(
                    "{what}: give `flops_reduction` (and no `ratio`)"
                )))
            }
        }
        for &r in &self.ratios {
            check_ratio(r)?;
        }
        if self.search != "annealing" && self.search != "evolution" {
            return Err(PruneError::Invalid(format!(
                "{what}: unknown search `{}` (annealing or evolution)",
                self.search
            )));
        }
        if choice == Choice::Auto && self.trials == 0 {
            return Err(PruneError::Invalid(format!(
                "{what}: `trials` must be at least 1"
            )));
        }
        if self.eval_samples == Some(0) {
            return Err(PruneError::Invalid(format!(
                "{what}: `eval_samples` must be at least 1"
            )));
        }
        Ok(())
    }
}

/// What pruning reads and writes besides the model and its options.
#[derive(Default)]
pub struct Inputs<'a> {
    /// The data: batch-norm calibration reads its training split, sensitivities and search
    /// rewards its test split.
    pub data: Option<&'a DataSplits>,
    /// The data carries no labels to score pruned models by (or the caller measures fidelity
    /// instead): the sensitivity analysis and the search, which need accuracy, are refused.
    pub label_free: bool,
    /// Sensitivities measured before (`slim sensitivity`) of this model (the caller checks
    /// their fingerprint): the sensitivity method takes them instead of analysing, and the
    /// search starts from the ratios they give.
    pub sensitivities: Option<Sensitivities>,
    /// Where the sensitivity method keeps its own analysis (resumed when it is there), with
    /// its plot beside it (`.svg`); without it, nothing is kept.
    pub sensitivity_file: Option<PathBuf>,
    /// The search's history file, resumed when it is there.
    pub history: Option<PathBuf>,
    /// Share the search through a study store (one worker of many) instead of a file.
    pub study: Option<(&'a dyn StudyStore, WorkerOptions)>,
    /// Before its reward is measured, each candidate is fine-tuned for one pass over this
    /// many training images with `reward_recipe` (0: not at all).
    pub reward_finetune_images: usize,
    pub reward_recipe: TrainConfig,
    /// The search's seed.
    pub seed: u64,
    /// [`compress`] measures the pruned model against the original on the test split (a
    /// caller that measures every model itself, as the pipeline does, leaves it off).
    pub measure: bool,
}

/// Progress of a search.
pub enum Progress<'p> {
    /// A search on this machine (from its history file).
    Search(SearchProgress<'p>),
    /// A worker of a shared study.
    Worker(WorkerProgress<'p>),
    /// The fine-tuning after pruning ([`compress`]).
    Train(&'p slim_core::train::Progress),
}

/// One group's share of the pruning.
#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    pub group: String,
    pub channels: usize,
    pub kept: usize,
    pub ratio: f64,
}

/// What the search found.
#[derive(Clone, Debug, Serialize)]
pub struct SearchReport {
    /// The history file, or the study store's description.
    pub history: String,
    pub trials: usize,
    pub initial_reward: f64,
    pub best_reward: f64,
    pub eval_samples: usize,
}

/// What [`run`] did.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    /// `uniform`, `sensitivity` or `auto`.
    pub method: &'static str,
    pub criterion: &'static str,
    /// The fraction of multiply-adds removed (as predicted from the ratios; it is exact).
    pub flops_reduction: f64,
    pub groups: Vec<GroupReport>,
    /// Groups the scope selected that cannot be pruned, and why.
    pub skipped: Vec<Skipped>,
    pub search: Option<SearchReport>,
    /// The sensitivity analysis made here.
    pub sensitivity: Option<PathBuf>,
}

/// Prunes `model` by `choice` with options `o`: the pruned model and what was done.
pub fn run(
    model: &Model,
    choice: Choice,
    o: &PruneOptions,
    inputs: Inputs<'_>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Model, PruneReport)> {
    let what = format!("prune.{}", choice.name());
    o.validate(choice, &what)?;
    let needs_labels = match choice {
        Choice::Uniform => false,
        Choice::Sensitivity => inputs.sensitivities.is_none(),
        Choice::Auto => true,
    };
    if inputs.label_free && needs_labels {
        return Err(PruneError::Invalid(format!(
            "{what}: no labels to score pruned models by (this method measures their \
             accuracy); prune uniformly, by a ratio or a FLOPs reduction, or from sensitivity \
             files"
        )));
    }
    let pruner = pruner(model, o, inputs.data)?;
    let mut search = None;
    let mut analysis = None;
    let ratios: Ratios = match (choice, o.ratio, o.flops_reduction) {
        (Choice::Uniform, Some(r), _) => pruner.uniform(r),
        (Choice::Uniform, None, Some(f)) => pruner.uniform_for_reduction(f)?.ratios,
        (Choice::Sensitivity, _, Some(f)) => match &inputs.sensitivities {
            Some(s) => sensitivity::ratios_for_reduction(s, &pruner, f)?,
            None => {
                let (evaluator, eval) = eval_set(o, need_data(&inputs, &what)?);
                let file = inputs.sensitivity_file.as_deref();
                let sens =
                    sensitivity::analyze(&pruner, &evaluator, &o.ratios, &eval, file, &|_| {})?;
                if let Some(file) = file {
                    slim_core::io::write_atomic(
                        &file.with_extension("svg"),
                        sensitivity::to_svg(&sens).as_bytes(),
                    )?;
                }
                analysis = inputs.sensitivity_file.clone();
                sensitivity::ratios_for_reduction(&sens, &pruner, f)?
            }
        },
        (Choice::Auto, _, Some(f)) => {
            let (r, report) = search_ratios(&pruner, o, f, &inputs, &what, progress)?;
            search = Some(report);
            r
        }
        _ => return Err(PruneError::Invalid(format!("{what}: no target"))),
    };
    let pruned = pruner.apply(&ratios)?;
    let groups = ratios
        .iter()
        .map(|(&g, &r)| {
            let channels = pruner.group(g).channels;
            GroupReport {
                group: pruner.key(g),
                channels,
                kept: kept_channels(channels, r),
                ratio: r,
            }
        })
        .collect();
    let report = PruneReport {
        method: choice.name(),
        criterion: o.criterion.name(),
        flops_reduction: pruner.predict_reduction(&ratios),
        groups,
        skipped: pruner.skipped().to_vec(),
        search,
        sensitivity: analysis,
    };
    Ok((pruned, report))
}

/// What [`compress`] did: the pruning, the fine-tuning, and the model before and after.
#[derive(Clone, Debug, Serialize)]
pub struct PruneOutcome {
    pub report: PruneReport,
    /// The original and the pruned model (accuracy where there are labels; bytes as the
    /// caller fills them in, from the files).
    pub before: Figures,
    pub after: Figures,
    /// Without labels: the pruned model's fidelity to the original.
    pub fidelity: Option<Fidelity>,
    pub finetune: Option<TrainReport>,
}

impl PruneOutcome {
    /// The before-and-after table, then a line for each group left unpruned.
    pub fn table(&self) -> String {
        let mut t = Comparison::new(["before", "after"], &self.before, &self.after)
            .fidelity(self.fidelity.as_ref())
            .table();
        for s in &self.report.skipped {
            t += &format!(
                "not pruned: group `{}` ({} channels): {}\n",
                s.group, s.channels, s.reason
            );
        }
        t
    }
}

/// Pruning from start to end: [`run`], then fine-tuning by `finetune` (on the labels, or
/// without them to reproduce the original), then the pruned model measured against the
/// original on the test split (accuracy, or fidelity without labels) when there is data and
/// `inputs.measure` asks for it. It is
/// `slim prune` and the pipeline's `prune.*` stages.
pub fn compress(
    model: &Model,
    choice: Choice,
    o: &PruneOptions,
    inputs: Inputs<'_>,
    finetune: Option<&Finetuning<'_>>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Model, PruneOutcome)> {
    let (data, label_free, measured) = (inputs.data, inputs.label_free, inputs.measure);
    if let Some(f) = finetune {
        f.config.validate()?;
        if data.is_none() {
            return Err(PruneError::Invalid(
                "fine-tuning after pruning needs data".into(),
            ));
        }
    }
    let (mut pruned, report) = run(model, choice, o, inputs, progress)?;
    let mut trained = None;
    if let (Some(f), Some(d)) = (finetune, data) {
        trained = Some(f.run(&mut pruned, model, d, label_free, &mut |p| {
            progress(Progress::Train(p))
        })?);
    }
    let measured = match data {
        Some(d) if measured => Some(measure(&pruned, model, d, label_free, None)?),
        _ => None,
    };
    let m = measured.as_ref();
    let outcome = PruneOutcome {
        report,
        before: Figures::of(model, m.and_then(|m| m.before.as_ref())),
        after: Figures::of(&pruned, m.and_then(|m| m.after.as_ref())),
        fidelity: measured.and_then(|m| m.fidelity),
        finetune: trained,
    };
    Ok((pruned, outcome))
}

/// The pruner of `o`'s criterion and scope, which recalibrates batch norms on `data`'s
/// training images when there are some and `o` asks for it.
pub fn pruner<'m>(
    model: &'m Model,
    o: &PruneOptions,
    data: Option<&DataSplits>,
) -> Result<Pruner<'m>> {
    let p = Pruner::new(model, o.criterion, &o.scope)?;
    Ok(match data {
        Some(d) if o.bn_calibration > 0 => p.with_calibration(Calibration {
            set: d.train.take(o.bn_calibration),
            normalize: d.normalize.clone(),
            batch_size: 64,
        }),
        _ => p,
    })
}

fn need_data<'a>(inputs: &Inputs<'a>, what: &str) -> Result<&'a DataSplits> {
    inputs
        .data
        .ok_or_else(|| PruneError::Invalid(format!("{what} needs data to measure accuracy on")))
}

/// The test images that score pruned models (the first `o.eval_samples`), and how they are
/// described in the files.
pub fn eval_set(o: &PruneOptions, data: &DataSplits) -> (Top1, EvalData) {
    let set = match o.eval_samples {
        Some(n) => data.test.take(n),
        None => data.test.clone(),
    };
    let eval = EvalData {
        description: format!("{}, {} test images", data.spec, set.labels.len()),
        fingerprint: set.fingerprint(),
    };
    let top1 = Top1 {
        set,
        normalize: data.normalize.clone(),
        batch_size: 256,
    };
    (top1, eval)
}

/// The recipe and the data (the first training images only, the rest of the set not copied)
/// of the short fine-tuning before each candidate's reward, where there is one.
fn reward_finetuning(
    inputs: &Inputs<'_>,
    data: &DataSplits,
    what: &str,
) -> Result<(TrainConfig, Option<DataSplits>)> {
    let cfg = TrainConfig {
        epochs: 1,
        schedule: Schedule::Constant,
        ..inputs.reward_recipe.clone()
    };
    let images = inputs.reward_finetune_images;
    if images == 0 {
        return Ok((cfg, None));
    }
    cfg.validate()?;
    if images < cfg.batch_size {
        return Err(PruneError::Invalid(format!(
            "{what}: reward fine-tuning on {images} images is less than one batch ({})",
            cfg.batch_size
        )));
    }
    let short = DataSplits {
        spec: data.spec.clone(),
        train: data.train.take(images),
        test: data.test.clone(),
        normalize: data.normalize.clone(),
        augment: data.augment.clone(),
        skipped: Vec::new(),
    };
    Ok((cfg, Some(short)))
}

/// The automatic search's ratios for a FLOPs reduction `f`.
fn search_ratios(
    pruner: &Pruner<'_>,
    o: &PruneOptions,
    f: f64,
    inputs: &Inputs<'_>,
    what: &str,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Ratios, SearchReport)> {
    let data = need_data(inputs, what)?;
    let (evaluator, eval) = eval_set(o, data);
    let method = if o.search == "evolution" {
        Method::evolution()
    } else {
        Method::annealing()
    };
    let cfg = AutoConfig {
        trials: o.trials,
        method,
        seed: inputs.seed,
        ..AutoConfig::new(f)
    };
    let init = match &inputs.sensitivities {
        Some(s) => Some(sensitivity::ratios_for_reduction(s, pruner, f)?),
        None => None,
    };
    let (short_cfg, short) = reward_finetuning(inputs, data, what)?;
    let mut reward_finetune = |m: &mut Model| -> slim_core::Result<()> {
        if let Some(short) = &short {
            train(m, short, &short_cfg, TrainOptions::default(), &mut |_| {})?;
        }
        Ok(())
    };
    let finetune: Option<&mut auto::Finetune<'_>> = match short {
        Some(_) => Some(&mut reward_finetune),
        None => None,
    };
    let key = json!({"data": eval.fingerprint, "samples": evaluator.set.labels.len(),
                     "reward_finetune_images": inputs.reward_finetune_images,
                     "reward_finetune": format!("{short_cfg:?}")});
    let (result, history) = match &inputs.study {
        None => {
            let r = auto::search(
                pruner,
                &cfg,
                init.as_ref(),
                &evaluator,
                finetune,
                inputs.history.as_deref(),
                key,
                &mut |p| progress(Progress::Search(p)),
            )?;
            let history = inputs
                .history
                .as_ref()
                .map(|h| h.display().to_string())
                .unwrap_or_default();
            (r, history)
        }
        Some((store, opts)) => {
            let r = auto::search_worker(
                pruner,
                &cfg,
                init.as_ref(),
                &evaluator,
                finetune,
                key,
                *store,
                opts.clone(),
                &mut |p| progress(Progress::Worker(p)),
            )?;
            (r, store.describe())
        }
    };
    let report = SearchReport {
        history,
        trials: result.history.trials.len(),
        initial_reward: result.initial_reward,
        best_reward: result.reward,
        eval_samples: evaluator.set.labels.len(),
    };
    Ok((result.ratios, report))
}
